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
    "paced-posterior-sample-refresh50": {"scheme": "paced-posterior", "mode": "weighted-sample",
                                         "refresh_every": 50},
    # on-policy distillation (reverse KL on the student's own samples, teacher-scored)
    "uniform-onpolicy": {"scheme": "uniform", "loss": "reverse", "on_policy": True},
    "paced-onpolicy-refresh50": {"scheme": "paced", "loss": "reverse", "on_policy": True,
                                 "refresh_every": 50},
    "hard-filter-onpolicy-refresh50": {"scheme": "hard-filter", "loss": "reverse", "on_policy": True,
                                       "refresh_every": 50},
    "paced-posterior-onpolicy-refresh50": {"scheme": "paced-posterior", "loss": "reverse", "on_policy": True,
                                           "refresh_every": 50},
    # the paper's regime (DESIGN.md §8): K samples per prompt from the current student, graded, each weighted
    # by w(p̂) of its group; reverse KL of the teacher on the student's samples; a uniform manifest
    # (no selection)
    **{f"{g}-group{sfx}": {"scheme": "uniform", "loss": "reverse", "on_policy": True, "group": g,
                           "self": self_}
       for self_, sfx in ((False, ""), (True, "-self"))
       for g in ("uniform", "hard-filter", "paced", "paced-posterior")},
    # the same with Σ w·L divided by the step's sample count N instead of Σ w (--group-normalize samples):
    # the weights scale each step instead of sharing it out (uniform is the same either way)
    **{f"{g}-group-n": {"scheme": "uniform", "loss": "reverse", "on_policy": True, "group": g,
                        "normalize": "samples"}
       for g in ("hard-filter", "paced", "paced-posterior")},
    # two stages: off-policy forward KL on the references (batch rows) for half the steps, then paced-group
    "two-stage-group": {"scheme": "uniform", "loss": "reverse", "on_policy": True, "group": "paced",
                        "first_stage": "forward"},
}
GROUP_ARMS = [a for a in ARMS if a.endswith(("-group", "-group-self"))]
# the teacher's prompt in self-distillation: the solved problem, then the problem (the task's alphabet has
# no other separator); the teacher is the student's starting checkpoint
SELF_TEMPLATE = "{prompt}{answer}+0={prompt}"


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
    from paced.jobs.manifest import ManifestInputs, snapshot_manifest, write_manifest_dir
    from paced.store.home import open_home
    from paced.store.problems import read_problems
    from paced.store.rollouts import read_rollouts
    from paced.trainer.flops import count_parameters

    spec = ARMS[arm]
    home_dir = arm_home(base, f"{arm}-s{seed}", Path(args.out))
    home = open_home(home_dir)
    scheme = WeightScheme(name=spec["scheme"], weight_floor=spec.get("weight_floor", 0.0),
                          uniform_mix=spec.get("uniform_mix", 0.0))
    mode = spec.get("mode", "weighted-loss")
    manifest, inputs = snapshot_manifest(home, ManifestInputs(student_id="base", dataset="arith",
                                                              weights=scheme, mode=mode, seed=seed))
    mdir = home_dir.parent / "manifest"
    write_manifest_dir(home, manifest, inputs, mdir, args.shard_size)
    sets = {"arith-sub": (read_problems(home, "arith-sub"), "numeric"),
            "mastered": (mastered_problems(home, "base", "arith"), "numeric")}
    side: dict[int, dict] = {}
    offset = {"step": 0}
    params: dict[str, int] = {}

    def on_step(step, model, tokenizer):
        params.setdefault("student", count_parameters(model))
        step += offset["step"]
        if (step % args.eval_every == 0 or step == args.steps) and step not in side:
            backend = HFBackend.from_model(model, tokenizer, batch_size=256)
            res = evaluate_backend(backend, sets, EvalConfig(k=1, max_new_tokens=8, seed=0, sampled=False))
            side[step] = {k: v["greedy"]["accuracy"] for k, v in res.items()}

    curve, summary = train_arm(spec, args, home_dir, mdir, seed, on_step, offset)
    # arms weighted by the base snapshot pay for the base student's rollouts; the others need none
    pays = spec["scheme"] != "uniform" or spec.get("group") == "paced-posterior"
    base_files = sorted((base / "rollouts" / "base").rglob("batch-*.parquet"))
    initial = int(pc.sum(read_rollouts(base_files)["tokens"]).as_py()) if pays else 0
    initial_flops = 2.0 * params["student"] * initial
    curve = [{**e, **{f"{k}_accuracy": v for k, v in side.get(e["step"], {}).items()},
              "total_tokens": e["train_tokens"] + e["rollout_tokens"] + e.get("generated_tokens", 0)
              + initial, "total_flops": e["flops"] + initial_flops} for e in curve]
    return {"arm": arm, "seed": seed, "curve": curve, "initial_rollout_tokens": initial,
            "summary": {k: summary.get(k)
                        for k in ("steps", "train_tokens", "rollout_tokens", "train_seconds",
                                  "rollout_seconds", "skipped_batches", "generated_tokens", "total_flops",
                                  "group")}}


def arm_config(spec: dict, args, home_dir: Path, mdir: Path, seed: int, out: Path, steps: int, **over):
    """The TrainConfig of one arm (a group arm: B = batch/K prompts × K samples per step)."""
    from paced.trainer.config import TrainConfig, parse_stages

    teacher, student = ("quick-teacher", "quick-student") if args.quick else ("teacher", "student")
    half = steps // 2
    group = spec.get("group")
    fields = dict(
        student=str(home_dir / "models" / student), teacher=str(home_dir / "models" / teacher),
        source=str(mdir), out=str(out), loss=spec.get("loss", "forward"), steps=steps,
        stages=parse_stages(f"forward:{half},reverse:{steps - half}") if spec.get("two_stage") else (),
        on_policy=spec.get("on_policy"),
        lr=args.lr, batch_size=args.batch_size, seed=seed, max_new_tokens=8,
        refresh_every=spec.get("refresh_every", 0),
        refresh_between_stages=spec.get("refresh_between_stages", False),
        eval_every=args.eval_every, progress=False,
    )
    if group:
        fields |= {"group_size": args.k, "group_scheme": group, "grader_workers": 1,
                   "group_normalize": spec.get("normalize", "weights"),
                   "batch_size": max(1, args.batch_size // args.k)}
    if spec.get("self"):
        fields |= {"teacher": fields["student"], "teacher_prompt_template": args.self_template}
    return TrainConfig(**(fields | over))


def train_arm(spec: dict, args, home_dir: Path, mdir: Path, seed: int, on_step, offset: dict):
    """Run the arm's training (two `train` calls for a first off-policy stage); (eval curve, summary)."""
    from paced.jobs.remeasure import HeldOutConfig, HeldOutEval, RemeasureConfig, RemeasureJob
    from paced.jobs.train import group_io
    from paced.trainer.loop import train

    def jobs():
        remeasure = RemeasureJob(RemeasureConfig(home=str(home_dir), reprobe_fraction=args.reprobe_fraction,
                                                 rollout_k=args.k, seed=seed, max_new_tokens=8,
                                                 progress=False))
        return remeasure, HeldOutEval(HeldOutConfig(home=str(home_dir), eval_dataset="arith-heldout",
                                                    eval_max_new_tokens=8, seed=seed))

    first, curve = spec.get("first_stage"), []
    steps = args.steps
    if first:  # off-policy on the references, batch rows, then the group stage from its final weights
        half = args.steps // 2
        config = arm_config(spec, args, home_dir, mdir, seed, home_dir.parent / "train1", half, loss=first,
                            on_policy=False, group_size=0, batch_size=args.batch_size)
        done = train(config, *jobs(), on_step=on_step)
        curve, offset["step"], steps = done["eval_curve"], half, args.steps - half
        student = str(home_dir.parent / "train1" / "final")
    config = arm_config(spec, args, home_dir, mdir, seed, home_dir.parent / "train", steps,
                        **({"student": student} if first else {}))
    io = group_io(config, str(home_dir))
    try:
        summary = train(config, *jobs(), on_step=on_step, group_io=io)
    finally:
        if io is not None:
            io.grading.close()
    if first:
        last = curve[-1]
        shifted = [{**e, "step": e["step"] + offset["step"],
                    **{k: e.get(k, 0) + last.get(k, 0) for k in ("train_tokens", "rollout_tokens", "flops",
                                                                 "generated_tokens", "train_seconds")}}
                   for e in summary["eval_curve"][1:]]
        curve = curve + shifted
    else:
        curve = summary["eval_curve"]
    for folder in ("train", "train1"):
        shutil.rmtree(home_dir.parent / folder, ignore_errors=True)
    return curve, summary


def group_by_arm(results: list[dict]) -> dict[str, list[dict]]:
    """Results per arm, in the order the arms first appear."""
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    return by_arm


def mean_sd(values) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    return "n/a" if v.size == 0 else f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1) if v.size > 1 else 0:.1f}"


def compute_of(entry: dict) -> float:
    """An eval entry's total compute: FLOPs (older results: tokens)."""
    return entry.get("total_flops", entry["total_tokens"])


def at_compute(run: dict, budget: float, value=lambda e: e["accuracy"]) -> float | None:
    """`value` (held-out accuracy) of a run at `budget` FLOPs, linear between its evals (None past its
    end, and before its first eval: an arm whose base rollouts alone cost more has not started)."""
    xs = [compute_of(e) for e in run["curve"]]
    if budget > xs[-1] * (1 + 1e-9) or budget < xs[0]:
        return None
    return float(np.interp(budget, xs, [value(e) for e in run["curve"]]))


def level_at(runs: list[dict], budget: float, level: int) -> str:
    """Mean accuracy (%) on one level at `budget` FLOPs; n/a when a run has not reached it."""
    values = [at_compute(r, budget, lambda e: e["by_difficulty"].get(str(level), np.nan)) for r in runs]
    return "n/a" if any(v is None for v in values) else f"{100 * np.mean(values):.0f}"


def zero_shares(runs: list[dict]) -> str:
    """Mean share of steps / samples with weight 0 (group arms)."""
    groups = [r["summary"].get("group") for r in runs if r["summary"].get("group")]
    if not groups:
        return "–"
    return (f"{100 * np.mean([g['zero_weight_step_share'] for g in groups]):.0f} / "
            f"{100 * np.mean([g['zero_weight_sample_share'] for g in groups]):.0f}")


def aggregate(results: list[dict], budget: float | None = None) -> str:
    """The Markdown table: final accuracy (equal steps), by level, forgetting, accuracy at equal FLOPs
    (`budget`; default the smallest final compute of any run, so that every run reaches it), weight-0
    shares."""
    by_arm = group_by_arm(results)
    budget = budget or min(compute_of(r["curve"][-1]) for r in results)
    levels = sorted({int(d) for r in results for d in r["curve"][-1]["by_difficulty"]})
    header = (f"| arm | held-out acc (%) | {' / '.join(map(str, levels))} digits (%) | mastered (%) | "
              f"subtraction (%) | acc at {budget:.2e} FLOPs (%) | weight-0 steps / samples (%) | "
              "total FLOPs | seconds |")
    header = header.replace("| mastered", f"| same at {budget:.2e} FLOPs (%) | mastered")
    lines = [header, "|" + "---|" * 10]
    for arm, runs in by_arm.items():
        finals = [r["curve"][-1] for r in runs]
        digits = " / ".join(f"{100 * np.mean([f['by_difficulty'].get(str(d), np.nan) for f in finals]):.0f}"
                            for d in levels)
        digits += " | " + " / ".join(level_at(runs, budget, d) for d in levels)
        seconds = np.mean([f.get("train_seconds", r["summary"].get("train_seconds") or 0)
                           for f, r in zip(finals, runs, strict=True)])
        lines.append(f"| {arm} | {mean_sd(f['accuracy'] for f in finals)} | {digits} | "
                     f"{mean_sd(f.get('mastered_accuracy') for f in finals)} | "
                     f"{mean_sd(f.get('arith-sub_accuracy') for f in finals)} | "
                     f"{mean_sd(at_compute(r, budget) for r in runs)} | {zero_shares(runs)} | "
                     f"{np.mean([compute_of(f) for f in finals]):.2e} | {seconds:.0f} |")
    return "\n".join(lines)


def curve_table(results: list[dict]) -> str:
    """Mean held-out accuracy per arm at every eval step (Markdown)."""
    by_arm = group_by_arm(results)
    steps = [e["step"] for e in next(iter(by_arm.values()))[0]["curve"]]
    lines = ["| arm | " + " | ".join(map(str, steps)) + " |", "|" + "---|" * (len(steps) + 1)]
    for arm, runs in by_arm.items():
        acc = 100 * np.mean([[e["accuracy"] for e in r["curve"]] for r in runs], axis=0)
        lines.append(f"| {arm} | " + " | ".join(f"{a:.1f}" for a in acc) + " |")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    """Mean held-out accuracy per arm against steps and against total FLOPs (training, sampling, rollouts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = group_by_arm(results)
    fig, (by_step, by_flops) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for arm, runs in by_arm.items():
        acc = 100 * np.mean([[e["accuracy"] for e in r["curve"]] for r in runs], axis=0)
        steps = [e["step"] for e in runs[0]["curve"]]
        flops = np.mean([[compute_of(e) for e in r["curve"]] for r in runs], axis=0)
        style = ({"linewidth": 2.5, "color": "black"} if arm in ("uniform", "uniform-group")
                 else {"linewidth": 1.2})
        if arm.endswith("-self"):
            style["linestyle"] = "--"
        if arm == "uniform" and "uniform-group" in by_arm:  # off-policy reference beside the group baseline
            style["linestyle"] = ":"
        by_step.plot(steps, acc, label=arm, **style)
        by_flops.plot(flops, acc, label=arm, **style)
    by_step.set(xlabel="training steps", ylabel="held-out accuracy (%)", title=title)
    by_flops.set(xlabel="total FLOPs (training + sampling + rollouts)", xscale="log",
                 title="at equal compute")
    by_flops.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=[*ARMS, "group"],
                   help="default: every arm but the weighted-sample, on-policy and group variants; `group`: "
                        "the group experiment (every -group arm, uniform, akl, two-stage-group)")
    p.add_argument("--self-template", default=SELF_TEMPLATE,
                   help="teacher prompt of the -self arms (teacher = the student's starting checkpoint)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--pool", type=int, default=2000,
                   help="training problems (the budget must not memorise them)")
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--reprobe-fraction", type=float, default=0.1)
    p.add_argument("--backend", default="transformers", help="rollouts of the base student")
    p.add_argument("--quick", action="store_true", help="the quick models (a smoke test, not a result)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--out", default=str(OUT), help="where runs/ and results.json go")
    p.add_argument("--home",
                   help="the base data home (default: OUT/home; the shipped models are installed there when "
                        "missing)")
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    p.add_argument("--budget", type=float, help="--report: compare at this many FLOPs (default: the smallest "
                   "final compute of any run)")
    p.add_argument("--plot", metavar="PNG",
                   help="where to draw the accuracy curves (default: OUT/curves.png)")
    args = p.parse_args()
    if "group" in args.arms:
        args.arms = [a for a in args.arms if a != "group"] + [*GROUP_ARMS, "uniform", "akl"]
        args.arms = list(dict.fromkeys(args.arms))
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        a = saved["args"]
        print(f"pool {a['pool']} problems, K={a['k']}, {a['steps']} steps × batch {a['batch_size']}, seeds "
              f"{a['seeds']}")
        print(aggregate(saved["results"], args.budget))
        print()
        print(curve_table(saved["results"]))
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
    print()
    print(curve_table(results))
    plot_curves(results, Path(args.plot or out / "curves.png"),
                f"{args.steps} steps, K={args.k}, lr {args.lr}")


if __name__ == "__main__":
    main()
