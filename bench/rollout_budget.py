"""Half the samples for the same weights? Fixed K fresh samples vs carried-over evidence.

A student of the built-in task (the quick teacher's shape, 64 hidden, 2 layers) is pre-trained
`--warm-steps` steps (checkpoint c0), then `--refreshes` more intervals of `--interval` steps
each (c1 .. cT): a student that keeps training between pass-rate refreshes. On every checkpoint
the pool is rolled out with the real `paced rollout` job (transformers backend, K samples per
problem, graded, committed) in three independent draws (rounds):

- **reference**: K = `--ref-k` (64) on c_t: the weights every estimate is compared with;
- **fixed K**: K = 8 fresh samples of every problem on c_t, nothing kept (today's refresh), and
  its first 4 and 2 samples (fixed K = 4, 2: the same spend as carry-over, without carry-over);
- **carry-over** (`paced.curriculum.carryover`): starts from c0's fixed K = 8 counts; at c_t
  the problems `select_fresh` picks (every 0 < p̂ < 1, settled ones by age) get `f` fresh
  samples (the first f of a third draw), added to the old counts × λ. Every (f, λ) of the
  grid is reported; the re-probe rate is `--reprobe-rate`.

Weights are the `paced` scheme's (α = β = 1), normalised to mean 1; errors against the
reference at the same checkpoint as `bench/refresh_error.py` measures them: relative L1, Pearson
r, eligibility flips (w > 0 in one, = 0 in the other). "samples" is what the strategy spends per
refresh (mean over c1..cT); each row is averaged over c1..cT.

    .venv/bin/python bench/rollout_budget.py --pool 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refresh_error import compare  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "rollout_budget"
MIX = dict(digit_weights=(1.0, 2.0, 3.0, 3.0), subtraction_fraction=0.25)


def build_checkpoints(out: Path, args) -> list[Path]:
    """c0 (warm-up) and c1..cT (more training each), saved once under `out/models`."""
    import torch

    from paced.tasks.models import ModelSize, build_tokenizer, init_model, save_model
    from paced.tasks.pretrain import PretrainConfig, pretrain

    dirs = [out / "models" / f"c{t}" for t in range(args.refreshes + 1)]
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = init_model(tokenizer, ModelSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
                       seed=0)
    pretrain(model, tokenizer, PretrainConfig(steps=args.warm_steps, batch_size=64, learning_rate=3e-3,
                                              warmup_steps=50, **MIX), progress=False)
    save_model(model, tokenizer, dirs[0])
    for t, folder in enumerate(dirs[1:], start=1):
        pretrain(model, tokenizer, PretrainConfig(steps=args.interval, batch_size=64, learning_rate=1e-3,
                                                  warmup_steps=0, seed=100 + t, **MIX), progress=False)
        save_model(model, tokenizer, folder)
    return dirs


def outcomes(home, checkpoint: Path, k: int, round_index: int, ids: list[str], backend) -> np.ndarray:
    """(problems × k) booleans: sample j of problem i graded correct (rolled out by `paced rollout`)."""
    from paced.jobs.rollout import RolloutConfig, rollout
    from paced.store.rollouts import batch_files, read_rollouts

    config = RolloutConfig(k=k, round=round_index, max_new_tokens=8, batch_size=256)
    rollout(home, checkpoint, "arith", config, student_id=checkpoint.name, backend=backend, progress=False)
    rows = read_rollouts(batch_files(home.rollouts_dir(checkpoint.name, config.sampling_hash, "arith")))
    index = {pid: i for i, pid in enumerate(ids)}
    table = np.zeros((len(ids), k), dtype=bool)
    for pid, j, outcome in zip(rows["problem_id"].to_pylist(), rows["sample_idx"].to_pylist(),
                               rows["outcome"].to_pylist(), strict=True):
        if j < k:
            table[index[pid], j] = outcome == "correct"
    return table


def weights(correct, n) -> np.ndarray:
    from paced.curriculum import WeightScheme, compute_weights

    w = compute_weights(np.asarray(correct, float), np.asarray(n, float), WeightScheme(name="paced"))
    return w / w.mean() if w.mean() > 0 else w


def measure(args) -> tuple[list[dict], dict]:
    from paced.backends.hf_backend import HFBackend
    from paced.cli import main as paced
    from paced.curriculum.carryover import Evidence, select_fresh, step_evidence
    from paced.store.home import open_home
    from paced.store.problems import read_problems

    out = Path(args.out).resolve()
    checkpoints = build_checkpoints(out, args)
    home_dir = out / f"home-{args.pool}"
    if not home_dir.exists():
        paced(["import", "builtin:arithmetic", "--dataset", "arith", "--n", str(args.pool), "--seed", "11",
               "--home", str(home_dir)])
    home = open_home(home_dir)
    ids = read_problems(home, "arith")["id"].to_pylist()
    grid = [(f, lam) for f in args.fresh for lam in args.decay]
    state = {g: None for g in grid}
    per_t: dict[str, list[dict]] = {}
    spread = {}
    for t, ckpt in enumerate(checkpoints):
        with HFBackend(ckpt, batch_size=512) as backend:
            fixed = outcomes(home, ckpt, 8, 2, ids, backend)
            draw = outcomes(home, ckpt, max(args.fresh), 3, ids, backend) if t else None
            ref = outcomes(home, ckpt, args.ref_k, 1, ids, backend) if t else None
        if t == 0:
            for g in grid:
                state[g] = step_evidence(Evidence.empty(len(ids)), np.ones(len(ids), bool), fixed.sum(1),
                                         np.full(len(ids), 8), 0.0)
            continue
        ref_w = weights(ref.sum(1), np.full(len(ids), args.ref_k))
        p_ref = ref.mean(1)
        spread[t] = {"frontier": int(((p_ref > 0) & (p_ref < 1)).sum()),
                     "all_correct": int((p_ref == 1).sum()), "all_wrong": int((p_ref == 0).sum())}
        for k in (8, 4, 2):
            per_t.setdefault(f"fixed K = {k}", []).append(
                {"samples": k * len(ids),
                 **compare(weights(fixed[:, :k].sum(1), np.full(len(ids), k)), ref_w)})
        for f, lam in grid:
            ev = state[(f, lam)]
            chosen = select_fresh(ids, ev.correct, ev.n, ev.age, args.reprobe_rate, args.seed, t)
            ev = state[(f, lam)] = step_evidence(ev, chosen, draw[:, :f].sum(1), np.full(len(ids), f), lam)
            per_t.setdefault(f"carry-over f = {f}, λ = {lam}", []).append(
                {"samples": int(chosen.sum()) * f, "carried": float(ev.carried.mean()),
                 **compare(weights(ev.correct, ev.n), ref_w)})
    rows = [{"strategy": name, **{key: float(np.mean([r[key] for r in runs])) for key in runs[0]},
             "per_checkpoint": runs} for name, runs in per_t.items()]
    return rows, spread


def table(rows: list[dict]) -> str:
    base = next(r["samples"] for r in rows if r["strategy"] == "fixed K = 8")
    lines = ["| strategy | samples / refresh | vs K = 8 | carried share | rel. L1 | Pearson r | flips |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        carried = f"{r['carried']:.2f}" if "carried" in r else "0"
        lines.append(f"| {r['strategy']} | {r['samples']:,.0f} | {r['samples'] / base:.0%} | {carried} | "
                     f"{r['rel_l1']:.3f} | {r['pearson']:.3f} | {r['eligibility_flips']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=500, help="problems in the pool")
    p.add_argument("--ref-k", type=int, default=64, help="samples per problem of the reference")
    p.add_argument("--fresh", type=int, nargs="+", default=[2, 4],
                   help="carry-over: fresh samples per re-probe")
    p.add_argument("--decay", type=float, nargs="+", default=[0.5, 0.8],
                   help="carry-over: decay λ of old counts")
    p.add_argument("--reprobe-rate", type=float, default=0.2, help="settled re-probe rate at age 0")
    p.add_argument("--warm-steps", type=int, default=500, help="pre-training steps before c0")
    p.add_argument("--interval", type=int, default=40, help="training steps between refreshes")
    p.add_argument("--refreshes", type=int, default=4, help="checkpoints after c0 (refreshes measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    started = time.perf_counter()
    rows, spread = measure(args)
    out = Path(args.out).resolve()
    (out / "rollout_budget.json").write_text(json.dumps({"args": vars(args), "rows": rows, "spread": spread},
                                                        indent=1))
    print(f"pool {args.pool}, reference K = {args.ref_k}, {args.refreshes} refreshes, "
          f"{time.perf_counter() - started:.0f} s; reference pass rates per checkpoint: {spread}")
    print(table(rows))


if __name__ == "__main__":
    main()
