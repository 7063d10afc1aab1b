"""The real-model experiment: on-policy group self-distillation of SmolLM2-135M-Instruct.

Every arm starts from the same converted model (`paced tasks real-model`), which is also its
teacher: the teacher sees the reference answer in its prompt (`--teacher-prompt-template`), both
sides rendered with the model's chat template (`--chat-template`). Each step samples K
completions for each of B prompts from the current student (T = 1), grades them, and weights
each sample's reverse-KL loss by w(p̂) of its group (DESIGN.md §8):

- `uniform-group`: w = 1; `hard-filter-group`: w = 1 where 0 < p̂ < 1; `paced-group`:
  w = p̂(1 − p̂); `paced-posterior-group`: the Beta posterior's mean of p(1 − p) with the base
  snapshot's counts as prior.

The pool is addition worded `What is A + B?` (1 and 2 digits: the 1-digit half is the model's
frontier, the 2-digit half mostly p̂ = 0), graded `numeric`, read through a uniform manifest of the
base snapshot (no selection: the weights act inside the step). Greedy
accuracy, with the chat template, on a held-out set by level (digits) and on a module the pool
lacks (forgetting), at step 0 (the base model, measured once), mid-run and at the end; compared
at equal steps and at equal FLOPs (the group mode's count: generated tokens 2N, trained tokens
6N + 2N for the teacher's forward).

    python bench/real_model.py --quick                      # smoke: a few problems, 1 step
    python bench/real_model.py --seeds 0 1 --steps 4 --jobs 3   # the defaults: K=4, 2 prompts a step

Results: OUT/results.json (--out, default bench/out/real_model) and a Markdown table on stdout;
`--report OUT/results.json` prints the table of an earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paced_vs_uniform import at_compute, compute_of, group_by_arm, mean_sd, zero_shares  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "real_model"
ARMS = {"uniform-group": "uniform", "hard-filter-group": "hard-filter", "paced-group": "paced",
        "paced-posterior-group": "paced-posterior"}
SELF_TEMPLATE = "{prompt}\n(The correct answer is {answer}.)"
FORGET_MODULE = "numbers__place_value"


def cli(*argv: str) -> dict:
    """Run a `paced` command in this process; its JSON summary (the last line of stdout)."""
    from paced.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"paced {' '.join(argv[:2])} failed ({code})")
    lines = out.getvalue().strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def addition_problems(n_pool: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint pool and held-out rows `What is A + B?`, half with 1-digit and half with 2-digit
    operands (difficulty = digits): the model's frontier is the 1-digit half (SmolLM2 answers the
    built-in task's bare `A+B=` almost never, even with the chat template)."""
    import random

    rng, seen, rows = random.Random(seed), set(), []
    total = n_pool + n_heldout
    while len(rows) < total:
        digits = 1 if len(rows) % 2 == 0 else 2
        a, b = (rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(2))
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "difficulty": digits})
    return rows[:n_pool], rows[n_pool:]


def prepare(base: Path, args) -> dict:
    """The model, the problems, the base rollouts and snapshot, the base model's evals (once)."""
    from paced.tasks.real_model import build_real_model

    home = str(base)
    model = build_real_model(base / "models").path
    if not (base / "problems" / "pool").exists():
        for name, rows in zip(("pool", "pool-heldout"), addition_problems(args.pool, args.heldout, seed=0),
                              strict=True):
            path = base / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            cli("import", str(path), "--dataset", name, "--grader", "numeric", "--home", home)
        cli("import", "builtin:mathematics", "--modules", FORGET_MODULE, "--levels", "easy", "--per-level",
            str(args.forget), "--seed", "0", "--dataset", "forget", "--home", home)
    started = time.perf_counter()
    rolled = cli("rollout", "--student", str(model), "--student-id", "base", "--dataset", "pool", "-k",
                 str(args.base_k or args.k),
                 "--temperature", "1", "--max-new-tokens", str(args.max_new_tokens), "--chat-template",
                 "--backend", args.backend, "--seed", "0", "--home", home)
    cli("refresh", "--student", "base", "--home", home)
    passrates = cli("passrates", "show", "--student", "base", "--json", "--home", home)
    rollout_seconds = time.perf_counter() - started
    evaluate = BenchEval(home, args.max_new_tokens)
    import torch

    from paced.trainer.checkpoint import load_model

    student, tokenizer = load_model(model, torch.float32, "cpu")
    started = time.perf_counter()
    step0 = evaluate(0, student, tokenizer, None)
    return {"model": str(model), "passrates": passrates["by_dataset"]["pool"], "base_rollouts": rolled,
            "rollout_seconds": round(rollout_seconds, 1), "step0": step0,
            "eval_seconds": round(time.perf_counter() - started, 1)}


class BenchEval:
    """The trainer's `Evaluate` hook: greedy accuracy with the chat template on the held-out
    pool (by level) and on the forgetting module; step 0 is the base model's (measured once)."""

    def __init__(self, home: str, max_new_tokens: int, step0: dict | None = None):
        self.home, self.max_new_tokens, self.step0 = home, max_new_tokens, step0

    def to_json(self) -> dict:
        return {"bench_eval": self.max_new_tokens}

    def check(self) -> None:
        pass

    def __call__(self, step: int, student, tokenizer, runtime) -> dict:
        if step == 0 and self.step0 is not None:
            return self.step0
        from paced.backends.hf_backend import HFBackend
        from paced.jobs.evaluate import EvalConfig, evaluate_backend
        from paced.store.home import open_home
        from paced.store.problems import dataset_info, read_problems

        home = open_home(self.home, create=False)
        sets = {name: (read_problems(home, name), dataset_info(home, name)["grader"])
                for name in ("pool-heldout", "forget")}
        backend = HFBackend.from_model(student, tokenizer, batch_size=64)
        config = EvalConfig(k=1, max_new_tokens=self.max_new_tokens, seed=0, sampled=False,
                            chat_template=True)
        with runtime.autocast() if runtime is not None else contextlib.nullcontext():
            res = evaluate_backend(backend, sets, config)
        held, forget = res["pool-heldout"]["greedy"], res["forget"]["greedy"]
        return {"step": step, "accuracy": held["accuracy"], "by_difficulty": held["by_difficulty"],
                "problems": held["problems"], "forget_accuracy": forget["accuracy"]}


def arm_home(base: Path, name: str, out: Path) -> Path:
    """A data home for one run: problems and models linked, the base snapshot copied."""
    home = out / "runs" / name / "home"
    if home.parent.exists():
        shutil.rmtree(home.parent)
    home.mkdir(parents=True)
    for part in ("SCHEMA_VERSION.json", "problems", "models"):
        (home / part).symlink_to(base / part)
    shutil.copytree(base / "snapshots" / "base", home / "snapshots" / "base")
    return home


def run_one(base: Path, arm: str, seed: int, args, setup: dict) -> dict:
    """Train one arm with one seed (in this process); its eval curve and summary."""
    from paced.curriculum import WeightScheme
    from paced.jobs.manifest import ManifestInputs, snapshot_manifest, write_manifest_dir
    from paced.jobs.train import group_io
    from paced.store.home import open_home
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import train

    home_dir = arm_home(base, f"{arm}-s{seed}", Path(args.out))
    home = open_home(home_dir)
    manifest, inputs = snapshot_manifest(home, ManifestInputs(student_id="base", dataset="pool", seed=seed,
                                                                  weights=WeightScheme(name="uniform")))
    mdir = home_dir.parent / "manifest"
    write_manifest_dir(home, manifest, inputs, mdir, 64)  # uniform weights: no selection
    model = setup["model"]
    every = args.eval_every or args.steps
    config = TrainConfig(
        student=model, teacher=model, source=str(mdir), out=str(home_dir.parent / "train"), loss="reverse",
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, max_length=512, seed=seed,
        max_new_tokens=args.max_new_tokens, chat_template=True, teacher_prompt_template=args.self_template,
        group_size=args.k, group_scheme=ARMS[arm], grader_workers=1, eval_every=every, progress=False)
    io_ = group_io(config, str(home_dir))
    try:
        summary = train(config, evaluate=BenchEval(str(base), args.max_new_tokens, setup["step0"]),
                        group_io=io_)
    finally:
        io_.grading.close()
    shutil.rmtree(home_dir.parent / "train", ignore_errors=True)
    curve = [{**e, "total_flops": e["flops"], "total_tokens": e["train_tokens"] + e["generated_tokens"]}
             for e in summary["eval_curve"]]
    return {"arm": arm, "seed": seed, "curve": curve,
            "summary": {k: summary.get(k)
                        for k in ("steps", "train_tokens", "generated_tokens", "train_seconds",
                                  "total_flops", "group")}}


def aggregate(results: list[dict], step0: dict) -> str:
    """The Markdown table: held-out accuracy at equal steps (final) and at equal FLOPs (the smallest
    final compute of any run), by level, forgetting, weight-0 shares, FLOPs and seconds."""
    by_arm = group_by_arm(results)
    budget = min(compute_of(r["curve"][-1]) for r in results)
    levels = sorted(step0["by_difficulty"], key=int)
    base_digits = " / ".join(f"{100 * step0['by_difficulty'][lv]:.0f}" for lv in levels)
    lines = [f"| arm | held-out acc (%) | by digits {' / '.join(levels)} (%) | acc at {budget:.2e} FLOPs (%) "
             f"| forget: {FORGET_MODULE} (%) | weight-0 steps / samples (%) | FLOPs | train seconds |",
             "|" + "---|" * 8,
             f"| base model (step 0) | {100 * step0['accuracy']:.1f} | "
             f"{base_digits} | – | "
             f"{100 * step0['forget_accuracy']:.1f} | – | 0 | 0 |"]
    for arm, runs in by_arm.items():
        finals = [r["curve"][-1] for r in runs]
        digits = " / ".join(f"{100 * np.mean([f['by_difficulty'].get(lv, np.nan) for f in finals]):.0f}"
                            for lv in levels)
        seconds = np.mean([r["summary"].get("train_seconds") or 0 for r in runs])
        lines.append(f"| {arm} | {mean_sd(f['accuracy'] for f in finals)} | {digits} | "
                     f"{mean_sd(at_compute(r, budget) for r in runs)} | "
                     f"{mean_sd(f.get('forget_accuracy') for f in finals)} | {zero_shares(runs)} | "
                     f"{np.mean([compute_of(f) for f in finals]):.2e} | {seconds:.0f} |")
    return "\n".join(lines)


def passrate_table(passrates: dict) -> str:
    """The base model's pass rates on the pool by level (Markdown)."""
    lines = ["| digits | problems | mean p̂ | p̂ = 0 (%) | 0 < p̂ < 1 (%) | p̂ = 1 (%) |",
             "|---|---|---|---|---|---|"]
    for level, s in passrates.get("by_level", {}).items():
        lines.append(f"| {level} | {s['problems']} | {s['mean_pass_rate']:.2f} | {100 * s['share_zero']:.0f} "
                     f"| {100 * s['share_frontier']:.0f} | {100 * s['share_one']:.0f} |")
    return "\n".join(lines)


def report(saved: dict) -> str:
    a, setup = saved["args"], saved["setup"]
    head = (f"pool {a['pool']} problems ('What is A + B?', 1–2 digits), held-out {a['heldout']}, forget "
            f"{a['forget']}; "
            f"K={a['k']}, {a['steps']} steps × {a['batch_size']} prompts, max_new_tokens "
            f"{a['max_new_tokens']}, "
            f"lr {a['lr']}, seeds {a['seeds']}; wall {saved.get('wall_seconds', 0):.0f} s")
    return "\n\n".join([head, aggregate(saved["results"], setup["step0"]),
                        passrate_table(setup["passrates"])])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["uniform-group", "hard-filter-group", "paced-group"],
                   choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out evals every N steps (default: at the end)")
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step (each with K samples)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt in a step (the group size)")
    p.add_argument("--base-k", type=int, default=None,
                   help="samples per problem of the base rollouts (default: K)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--pool", type=int, default=16, help="training problems (half 1-digit, half 2-digit)")
    p.add_argument("--heldout", type=int, default=12, help="held-out problems (half 1-digit, half 2-digit)")
    p.add_argument("--forget", type=int, default=6, help=f"problems of {FORGET_MODULE} (forgetting)")
    p.add_argument("--self-template", default=SELF_TEMPLATE,
                   help="the teacher's prompt (teacher = the model)")
    p.add_argument("--backend", default="transformers",
                   help="backend of the base rollouts (transformers, vllm)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one process each)")
    p.add_argument("--quick", action="store_true",
                   help="smoke: 4 problems, K=2, 1 step, 1 seed, 8 new tokens")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.pool, args.heldout, args.forget, args.k, args.steps, args.eval_every = 4, 2, 2, 2, 1, 0
        args.seeds, args.max_new_tokens, args.batch_size = args.seeds[:1], 8, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    out = Path(args.out).resolve()
    args.out = str(out)
    base = out / "home"
    if args.one:
        setup = json.loads((out / "setup.json").read_text())
        result = run_one(base, args.one[0], int(args.one[1]), args, setup)
        (out / "runs" / f"{args.one[0]}-s{args.one[1]}" / "result.json").write_text(json.dumps(result))
        return
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    setup = prepare(base, args)
    (out / "setup.json").write_text(json.dumps(setup))
    print(f"base: {setup['rollout_seconds']} s rollouts, {setup['eval_seconds']} s eval; "
          f"held-out {setup['step0']['accuracy']}", file=sys.stderr, flush=True)

    def launch(job):
        arm, seed = job
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", arm,
               str(seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // args.jobs)),
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            return None
        print(f"done: {arm} seed {seed} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        return json.loads((out / "runs" / f"{arm}-s{seed}" / "result.json").read_text())

    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(launch, jobs) if r]
    if len(results) < len(jobs):
        raise SystemExit(f"{len(jobs) - len(results)} of {len(jobs)} runs failed (see above)")
    saved = {"args": vars(args), "setup": setup, "results": results,
             "wall_seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(saved, indent=1))
    print(report(saved))


if __name__ == "__main__":
    main()
