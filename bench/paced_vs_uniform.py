"""The experiment: PACED weighting vs uniform and the other arms, on the built-in task.

Same student, teacher, problem pool, seed set and step budget for every arm; forward KL on
verified teacher references unless an arm says otherwise. Per arm and seed, held-out greedy
accuracy is measured every --eval-every steps (a curve) together with the cumulative training
and rollout tokens, so arms compare at equal steps *and* at equal total compute (the weighted
arms pay for their pass-rate rollouts: the initial measurement and every refresh). Forgetting is
measured on problems the weighting never sees: the base student's mastered problems (p̂ = 1)
and subtraction, a skill both models learned in pre-training that the pool never shows.

    .venv/bin/python bench/paced_vs_uniform.py --seeds 0 1 2 --steps 200 --jobs 2
    .venv/bin/python bench/paced_vs_uniform.py --arms uniform paced paced-refresh50 --seeds 0

Each (arm, seed) runs in its own process and data home (problems, references and models are
linked, the base snapshot copied), so refresh arms never touch another arm's pass rates.
Results: OUT/results.json (--out, default bench/out/experiment) and a Markdown table on stdout;
`--report OUT/results.json [--plot PNG]` prints the table (and draws the curves) of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "experiment"

ARMS: dict[str, dict] = {
    "uniform": {"scheme": "uniform"},
    "hard-filter": {"scheme": "hard-filter"},
    "paced": {"scheme": "paced"},
    "paced-posterior": {"scheme": "paced-posterior"},
    "akl": {"scheme": "uniform", "loss": "akl"},
    "two-stage": {"scheme": "paced", "two_stage": True, "refresh_between_stages": True},
    "paced-refresh50": {"scheme": "paced", "refresh_every": 50},
    "paced-refresh200": {"scheme": "paced", "refresh_every": 200},
    "hard-filter-refresh50": {"scheme": "hard-filter", "refresh_every": 50},
    "paced-floor": {"scheme": "paced", "weight_floor": 0.2},
    "paced-mix": {"scheme": "paced", "uniform_mix": 0.2},
    # the guards on top of the closed loop (DESIGN.md §7: refreshing is the regime that gains)
    "paced-posterior-refresh50": {"scheme": "paced-posterior", "refresh_every": 50},
    "paced-floor-refresh50": {"scheme": "paced", "weight_floor": 0.2, "refresh_every": 50},
    "paced-mix-refresh50": {"scheme": "paced", "uniform_mix": 0.2, "refresh_every": 50},
    # weights as sampling probabilities (unit loss weights): every batch keeps its full size
    "paced-sample-refresh50": {"scheme": "paced", "mode": "weighted-sample", "refresh_every": 50},
    "paced-posterior-sample": {"scheme": "paced-posterior", "mode": "weighted-sample"},
    "paced-posterior-sample-refresh50": {"scheme": "paced-posterior", "mode": "weighted-sample", "refresh_every": 50},
    # on-policy distillation (reverse KL on the student's own samples, teacher-scored)
    "uniform-onpolicy": {"scheme": "uniform", "loss": "reverse", "on_policy": True},
    "paced-onpolicy-refresh50": {"scheme": "paced", "loss": "reverse", "on_policy": True, "refresh_every": 50},
    "hard-filter-onpolicy-refresh50": {"scheme": "hard-filter", "loss": "reverse", "on_policy": True,
                                       "refresh_every": 50},
    "paced-posterior-onpolicy-refresh50": {"scheme": "paced-posterior", "loss": "reverse", "on_policy": True,
                                           "refresh_every": 50},
}


DEFAULT_ARMS = [a for a, spec in ARMS.items() if "mode" not in spec and not spec.get("on_policy")]


def prepare(home: Path, args) -> None:
    """Problems, models, references, the base rollouts and snapshot (the demo's full setup)."""
    from paced.jobs.demo import Demo, DemoConfig
    from paced.jobs.demo import prepare as demo_prepare

    cfg = DemoConfig(quick=args.quick, train_problems=args.pool, heldout_problems=args.heldout, k=args.k,
                     rollout_backend=args.backend)
    demo_prepare(Demo(home, cfg))


def arm_home(base: Path, name: str, out: Path = OUT) -> Path:
    """A data home for one run: shared read-only parts linked, the base snapshot copied."""
    home = out / "runs" / name / "home"
    if home.exists():
        shutil.rmtree(home.parent)
    home.mkdir(parents=True)
    for part in ("SCHEMA_VERSION.json", "problems", "references", "models"):
        (home / part).symlink_to(base / part)
    shutil.copytree(base / "snapshots" / "base", home / "snapshots" / "base")
    return home


def run_one(base: Path, arm: str, seed: int, args) -> dict:
    """Train one arm with one seed (in this process) and return its curves and compute."""
    import pyarrow.compute as pc

    from paced.backends.hf_backend import HFBackend
    from paced.curriculum import WeightScheme
    from paced.jobs.evaluate import EvalConfig, evaluate_backend, mastered_problems
    from paced.jobs.manifest import manifest_record, snapshot_manifest, write_manifest_dir
    from paced.jobs.remeasure import HeldOutConfig, HeldOutEval, RemeasureConfig, RemeasureJob
    from paced.store.home import open_home
    from paced.store.problems import read_problems
    from paced.store.rollouts import read_rollouts
    from paced.trainer.config import TrainConfig, parse_stages
    from paced.trainer.loop import train

    spec = ARMS[arm]
    home_dir = arm_home(base, f"{arm}-s{seed}", Path(args.out))
    home = open_home(home_dir)
    scheme = WeightScheme(spec["scheme"], floor=spec.get("weight_floor", 0.0), mix=spec.get("uniform_mix", 0.0))
    mode = spec.get("mode", "weighted-loss")
    manifest, sid = snapshot_manifest(home, "base", "arith", scheme, seed, mode=mode)
    mdir = home_dir.parent / "manifest"
    write_manifest_dir(home, manifest, manifest_record("base", "arith", sid, scheme, mode, seed), mdir,
                       args.shard_size)
    sets = {"arith-sub": (read_problems(home, "arith-sub"), "numeric"),
            "mastered": (mastered_problems(home, "base", "arith"), "numeric")}
    side: dict[int, dict] = {}

    def on_step(step, model, tokenizer):
        if step % args.eval_every == 0 or step == args.steps:
            backend = HFBackend.from_model(model, tokenizer, batch_size=256)
            res = evaluate_backend(backend, sets, EvalConfig(k=1, max_new_tokens=8, seed=0, sampled=False))
            side[step] = {k: v["greedy"]["accuracy"] for k, v in res.items()}

    teacher, student = ("quick-teacher", "quick-student") if args.quick else ("teacher", "student")
    half = args.steps // 2
    config = TrainConfig(
        student=str(home_dir / "models" / student), teacher=str(home_dir / "models" / teacher),
        source=str(mdir), out=str(home_dir.parent / "train"), loss=spec.get("loss", "forward"), steps=args.steps,
        stages=parse_stages(f"forward:{half},reverse:{args.steps - half}") if spec.get("two_stage") else (),
        on_policy=spec.get("on_policy"),
        lr=args.lr, batch_size=args.batch_size, seed=seed, max_new_tokens=8,
        refresh_every=spec.get("refresh_every", 0), refresh_between_stages=spec.get("refresh_between_stages", False),
        eval_every=args.eval_every, progress=False,
    )
    remeasure = RemeasureJob(RemeasureConfig(home=str(home_dir), reprobe_fraction=args.reprobe_fraction,
                                             rollout_k=args.k, seed=seed, max_new_tokens=8, progress=False))
    evaluate = HeldOutEval(HeldOutConfig(home=str(home_dir), eval_dataset="arith-heldout", eval_max_new_tokens=8,
                                         seed=seed))
    summary = train(config, remeasure, evaluate, on_step=on_step)
    # the weighted arms pay for the base student's pass-rate rollouts; uniform needs none
    base_files = sorted((base / "rollouts" / "base").rglob("batch-*.parquet"))
    initial = 0 if spec["scheme"] == "uniform" else int(pc.sum(read_rollouts(base_files)["tokens"]).as_py())
    curve = [{**e, **{f"{k}_accuracy": v for k, v in side.get(e["step"], {}).items()},
              "total_tokens": e["train_tokens"] + e["rollout_tokens"] + initial} for e in summary["eval_curve"]]
    shutil.rmtree(home_dir.parent / "train", ignore_errors=True)
    return {"arm": arm, "seed": seed, "curve": curve, "initial_rollout_tokens": initial,
            "summary": {k: summary.get(k) for k in ("steps", "train_tokens", "rollout_tokens", "train_seconds",
                                                       "rollout_seconds", "skipped_batches")}}


def group_by_arm(results: list[dict]) -> dict[str, list[dict]]:
    """Results per arm, in the order the arms first appear."""
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    return by_arm


def mean_sd(values) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    return "n/a" if v.size == 0 else f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1) if v.size > 1 else 0:.1f}"


def aggregate(results: list[dict]) -> str:
    """The Markdown table: final accuracy, forgetting, steps to uniform's final, equal compute."""
    by_arm = group_by_arm(results)
    # the reference arm: `uniform`, else the first uniform-weighted variant of the run
    baseline = "uniform" if "uniform" in by_arm else next((a for a in by_arm if a.startswith("uniform")), None)
    uni = by_arm.get(baseline) if baseline else None
    target = np.mean([r["curve"][-1]["accuracy"] for r in uni]) if uni else None
    budget = np.mean([r["curve"][-1]["total_tokens"] for r in uni]) if uni else None
    levels = sorted({int(d) for r in results for d in r["curve"][-1]["by_difficulty"]})
    header = (f"| arm | held-out acc (%) | {' / '.join(map(str, levels))} digits (%) | mastered (%) | "
              "subtraction (%) | steps to uniform's final | acc at uniform's compute (%) | total tokens |")
    lines = [header, "|" + "---|" * 8]
    for arm, runs in by_arm.items():
        finals = [r["curve"][-1] for r in runs]
        steps = [e["step"] for e in runs[0]["curve"]]
        mean_curve = np.mean([[e["accuracy"] for e in r["curve"]] for r in runs], axis=0)
        reach = next((s for s, a in zip(steps, mean_curve) if target is not None and a >= target), None)
        at_budget = []
        for r in runs:
            inside = [e["accuracy"] for e in r["curve"] if budget is not None and e["total_tokens"] <= budget]
            at_budget.append(inside[-1] if inside else None)
        digits = " / ".join(f"{100 * np.mean([f['by_difficulty'].get(str(d), np.nan) for f in finals]):.0f}"
                            for d in levels)
        lines.append(f"| {arm} | {mean_sd(f['accuracy'] for f in finals)} | {digits} | "
                     f"{mean_sd(f.get('mastered_accuracy') for f in finals)} | "
                     f"{mean_sd(f.get('arith-sub_accuracy') for f in finals)} | {reach if reach is not None else 'not reached'} | "
                     f"{mean_sd(at_budget)} | {np.mean([f['total_tokens'] for f in finals]):,.0f} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    """Mean held-out accuracy per arm against steps and against total (training + rollout) tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = group_by_arm(results)
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for arm, runs in by_arm.items():
        acc = 100 * np.mean([[e["accuracy"] for e in r["curve"]] for r in runs], axis=0)
        steps = [e["step"] for e in runs[0]["curve"]]
        tokens = np.mean([[e["total_tokens"] for e in r["curve"]] for r in runs], axis=0)
        style = {"linewidth": 2.5, "color": "black"} if arm == "uniform" else {"linewidth": 1.2}
        by_step.plot(steps, acc, label=arm, **style)
        by_tokens.plot(tokens, acc, label=arm, **style)
    by_step.set(xlabel="training steps", ylabel="held-out accuracy (%)", title=title)
    by_tokens.set(xlabel="total tokens (training + rollouts)", xscale="log", title="at equal compute")
    by_tokens.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS),
                   help="default: every arm but the weighted-sample and on-policy variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--pool", type=int, default=2000, help="training problems (the budget must not memorise them)")
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--reprobe-fraction", type=float, default=0.1)
    p.add_argument("--backend", default="transformers", help="rollouts of the base student")
    p.add_argument("--quick", action="store_true", help="the quick models (a smoke test, not a result)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--out", default=str(OUT), help="where runs/ and results.json go")
    p.add_argument("--home", help="the base data home (default: OUT/home; models are built there when missing)")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    p.add_argument("--plot", metavar="PNG", help="where to draw the accuracy curves (default: OUT/curves.png)")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        a = saved["args"]
        print(f"pool {a['pool']} problems, K={a['k']}, {a['steps']} steps × batch {a['batch_size']}, seeds {a['seeds']}")
        print(aggregate(saved["results"]))
        if args.plot:
            plot_curves(saved["results"], Path(args.plot), f"{a['steps']} steps, K={a['k']}, lr {a['lr']}")
        return
    out = Path(args.out).resolve()
    args.out = str(out)
    base = Path(args.home).resolve() if args.home else out / "home"
    if args.one:
        result = run_one(base, args.one[0], int(args.one[1]), args)
        (out / "runs" / f"{args.one[0]}-s{args.one[1]}" / "result.json").write_text(json.dumps(result))
        return
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare(base, args)
    passthrough = sys.argv[1:]

    def launch(job):
        arm, seed = job
        cmd = [sys.executable, __file__, *passthrough, "--one", arm, str(seed)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{arm} seed {seed} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        print(f"done: {arm} seed {seed}", file=sys.stderr, flush=True)
        return json.loads((out / "runs" / f"{arm}-s{seed}" / "result.json").read_text())

    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(launch, jobs) if r]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"pool {args.pool} problems, K={args.k}, {args.steps} steps × batch {args.batch_size}, "
          f"seeds {args.seeds}, {time.perf_counter() - started:.0f} s")
    print(aggregate(results))
    plot_curves(results, Path(args.plot or out / "curves.png"), f"{args.steps} steps, K={args.k}, lr {args.lr}")


if __name__ == "__main__":
    main()
