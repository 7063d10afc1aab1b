"""What a cheap refresh costs and how far its weights are from a full refresh on the same checkpoint.

The student is trained for S steps (uniform weights, forward KL), then its checkpoint is measured
in four ways, all with the same sampling settings as the base snapshot:

- **full**: every problem of the pool rolled out K times (round 1) — the reference weights;
- **cheap (f)**: `select_reprobe(base snapshot, f, seed, round 1)` — every 0 < p̂ < 1 plus a
  rotating share f of the ends — with the other problems carried from the base snapshot. Its
  re-rolled problems use the very samples of the full refresh, so its error is the staleness of
  what it carried, nothing else;
- **second full draw** (round 2): the sampling noise of a full refresh, the floor any refresh has;
- **no refresh**: the base snapshot's own weights (what training on stale pass rates means).

Weights are the `paced` scheme's (α = β = 1), each set normalised to mean 1 over the pool. Errors
against the full refresh: relative L1 (Σ|w − w_full| / Σ w_full), Pearson r, and how many
problems change eligibility (w > 0 in one, = 0 in the other). Rollout samples, generated tokens
and seconds are measured (seconds: the cheap set of the first fraction, and the full pool).

    .venv/bin/python bench/refresh_error.py --train-steps 50 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paced_vs_uniform import OUT, arm_home  # noqa: E402
from paced_vs_uniform import prepare as prepare_base  # noqa: E402


def train_checkpoint(base: Path, steps: int, args) -> tuple[Path, Path]:
    """The student trained `steps` steps on uniform weights: (its data home, its final folder)."""
    from paced.curriculum import WeightScheme
    from paced.jobs.manifest import ManifestInputs, snapshot_manifest, write_manifest_dir
    from paced.store.home import open_home
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import train

    home_dir = arm_home(base, f"refresh-error-{steps}", Path(args.out))
    home = open_home(home_dir)
    scheme = WeightScheme(name="uniform")
    manifest, inputs = snapshot_manifest(home, ManifestInputs(student_id="base", dataset="arith",
                                                              weights=scheme, seed=args.seed))
    mdir = home_dir.parent / "manifest"
    write_manifest_dir(home, manifest, inputs, mdir, 64)
    teacher, student = ("quick-teacher", "quick-student") if args.quick else ("teacher", "student")
    out = home_dir.parent / "train"
    train(TrainConfig(student=str(home_dir / "models" / student), teacher=str(home_dir / "models" / teacher),
                      source=str(mdir), out=str(out), loss="forward", steps=steps, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed, max_new_tokens=8, progress=False))
    return home_dir, out / "final"


def weights_of(table, ids: list[str]) -> np.ndarray:
    """`paced` weights of a snapshot table in the order of `ids`, normalised to mean 1."""
    from paced.curriculum import WeightScheme, compute_weights

    rows = dict(zip(table["problem_id"].to_pylist(),
                    zip(table["correct"].to_pylist(), table["n"].to_pylist(), strict=True), strict=True))
    c, n = (np.array([rows[i][j] for i in ids], dtype=float) for j in (0, 1))
    w = compute_weights(c, n, WeightScheme(name="paced"))
    return w / w.mean() if w.mean() > 0 else w


def compare(w: np.ndarray, ref: np.ndarray) -> dict:
    return {"rel_l1": float(np.abs(w - ref).sum() / ref.sum()), "pearson": float(np.corrcoef(w, ref)[0, 1]),
            "eligibility_flips": int(((w > 0) != (ref > 0)).sum())}


def measure(base: Path, steps: int, args) -> list[dict]:
    from paced.backends import load_backend
    from paced.backends.base import model_id
    from paced.curriculum.reprobe import select_reprobe
    from paced.jobs.lineage import read_lineage, refresh_lineage
    from paced.jobs.rollout import RolloutConfig, rollout
    from paced.store.home import open_home
    from paced.store.snapshots import list_snapshots, read_snapshot

    home_dir, checkpoint = train_checkpoint(base, steps, args)
    home = open_home(home_dir)
    base_sid = list_snapshots(home, "base")[0]
    base_table = read_snapshot(home, "base", base_sid, dataset="arith")
    ids = sorted(base_table["problem_id"].to_pylist())
    ckpt_id = model_id(checkpoint)
    r1, r2 = (RolloutConfig(k=args.k, round=r, seed=0, temperature=1.0, max_new_tokens=8) for r in (1, 2))
    cheap_ids = {f: sorted(select_reprobe(base_table, f, args.seed, 1).to_pylist()) for f in args.fractions}
    rows = []
    with load_backend("transformers", checkpoint, batch_size=256) as backend:
        def roll(config, problem_ids):
            return rollout(home, checkpoint, "arith", config, student_id=ckpt_id, problem_ids=problem_ids,
                           backend=backend, progress=False)

        first = roll(r1, cheap_ids[args.fractions[0]])  # the default cheap refresh, timed on its own
        rest = roll(r1, ids)  # completes the full round-1 measurement (what is committed is skipped)
        second = roll(r2, ids)
    full_sid = refresh_lineage(home, "full", ckpt_id, "arith", r1.sampling_hash, None, problem_ids=ids)
    second_sid = refresh_lineage(home, "second-draw", ckpt_id, "arith", r2.sampling_hash, None,
                                 problem_ids=ids)
    ref = weights_of(read_snapshot(home, "full", full_sid), ids)
    full_rec = read_lineage(home, "full", full_sid)

    def row(name, table, rerolled, samples, tokens, seconds):
        return {"train_steps": steps, "refresh": name, "rerolled": rerolled, "samples": samples,
                "tokens": tokens, "seconds": seconds, **compare(weights_of(table, ids), ref)}

    rows.append(row("no refresh (base snapshot)", base_table, 0, 0, 0, 0.0))
    for f in args.fractions:
        sid = refresh_lineage(home, f"cheap-{f}", ckpt_id, "arith", r1.sampling_hash, base_sid,
                              problem_ids=cheap_ids[f], previous_student_id="base")
        rec = read_lineage(home, f"cheap-{f}", sid)
        seconds = first["seconds"] if f == args.fractions[0] else None
        rows.append(row(f"cheap, reprobe fraction {f}", read_snapshot(home, f"cheap-{f}", sid),
                        rec["rerolled"], rec["samples"], rec["tokens"], seconds))
    rows.append(row("full (reference)", read_snapshot(home, "full", full_sid), full_rec["rerolled"],
                    full_rec["samples"], full_rec["tokens"], round(first["seconds"] + rest["seconds"], 3)))
    second_rec = read_lineage(home, "second-draw", second_sid)
    rows.append(row("full, second draw (noise floor)", read_snapshot(home, "second-draw", second_sid),
                    second_rec["rerolled"], second_rec["samples"], second_rec["tokens"], second["seconds"]))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| steps | refresh | re-rolled | samples | tokens | seconds | rel. L1 vs full | Pearson r | "
             "eligibility flips |", "|" + "---|" * 9]
    for r in rows:
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['train_steps']} | {r['refresh']} | {r['rerolled']} | {r['samples']:,} | "
                     f"{r['tokens']:,} | "
                     f"{seconds} | {r['rel_l1']:.3f} | {r['pearson']:.3f} | {r['eligibility_flips']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", nargs="+", type=int, default=[50, 200],
                   help="checkpoints to measure: the student after this many training steps")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.0, 0.25],
                   help="re-probe fractions of the cheap refresh (the first one is timed)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--backend", default="transformers", help="rollouts of the base student")
    p.add_argument("--quick", action="store_true", help="the quick models (a smoke test, not a result)")
    p.add_argument("--out", default=str(OUT), help="where runs/ and refresh_error.json go")
    p.add_argument("--home", help="the base data home (default: OUT/home, shared with paced_vs_uniform)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    base = Path(args.home).resolve() if args.home else out / "home"
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepare_base(base, args)
    rows = [r for steps in args.train_steps for r in measure(base, steps, args)]
    saved = out / "refresh_error.json"
    saved.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"pool {args.pool} problems, K={args.k}, {time.perf_counter() - started:.0f} s; {saved}")
    print(table(rows))


if __name__ == "__main__":
    main()
