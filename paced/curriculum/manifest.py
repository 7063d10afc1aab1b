"""Manifests: a deterministic epoch order of problem ids with weights, cut into shards.

Pure: an Arrow pass-rate table in, an Arrow manifest out. Two modes:

- `weighted-loss`: every problem with w > 0 exactly once per epoch, in a seeded shuffle; weights
  rescaled to mean 1 (the trainer multiplies each problem's loss by its weight).
- `weighted-sample`: N draws with replacement, probability ∝ w, unit weights.

The order depends only on (the set of problems and counts, scheme, seed, epoch, mode): the input
is sorted by problem id first, so the input's row order does not matter. Same inputs ⇒ same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from paced.curriculum.weights import WeightScheme, compute_weights, effective_sample_size
from paced.errors import InputError

MODES = ("weighted-loss", "weighted-sample")

MANIFEST_SCHEMA = pa.schema([
    ("position", pa.int64()),
    ("problem_id", pa.string()),
    ("weight", pa.float64()),
    ("pass_rate", pa.float64()),
    ("n", pa.int64()),
])


@dataclass(frozen=True)
class Manifest:
    """One epoch's ordered items, plus what was left out and why."""

    items: pa.Table  # MANIFEST_SCHEMA
    epoch: int
    seed: int
    mode: str
    scheme: WeightScheme
    measured: int  # problems with at least one rollout
    unmeasured: int  # problems in the table with n == 0 (reported, never weighted)
    zero_weight: int  # measured problems left out because w == 0
    effective_sample_size: float

    @property
    def num_items(self) -> int:
        return self.items.num_rows


def _rng(seed: int, epoch: int) -> np.random.Generator:
    if seed < 0 or epoch < 0:
        raise InputError(f"`seed` and `epoch` must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch])


def _sorted_counts(pass_rates: pa.Table):
    """(ids, correct, total, n) sorted by id: the counts the weights use (the evidence columns
    `evidence_correct`/`evidence_n` of a carry-over snapshot when present, else `correct`/`n`)
    and the integer sample counts `n`."""
    for col in ("problem_id", "correct", "n"):
        if col not in pass_rates.column_names:
            raise InputError(f"pass-rate table lacks column {col!r}", detail={"field": col})
    evidence = "evidence_n" in pass_rates.column_names and "evidence_correct" in pass_rates.column_names
    counts = ["evidence_correct", "evidence_n"] if evidence else ["correct", "n"]
    order = pc.sort_indices(pass_rates.column("problem_id"))
    table = pass_rates.select(["problem_id", *counts, "n"] if evidence
                              else ["problem_id", "correct", "n"]).take(order)
    ids = table.column("problem_id").combine_chunks()
    if len(ids) > 1 and pc.any(pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))).as_py():
        raise InputError("pass-rate table has duplicate problem ids")
    n = table.column("n").to_numpy().astype(np.int64)
    if not evidence:
        return ids, table.column("correct").to_numpy().astype(np.int64), n, n
    return (ids, table.column(1).to_numpy().astype(np.float64), table.column(2).to_numpy().astype(np.float64),
            n)


def build_manifest(pass_rates: pa.Table, scheme: WeightScheme, seed: int, epoch: int = 0,
                   mode: str = "weighted-loss", num_samples: int | None = None) -> Manifest:
    """The epoch's manifest for a pass-rate table with columns problem_id, correct, n (and, in a
    carry-over snapshot, evidence_correct, evidence_n: the weights and `pass_rate` use those)."""
    if mode not in MODES:
        raise InputError(f"`mode` must be one of {list(MODES)}, got {mode!r}", detail={"field": "mode"})
    ids, correct, total, samples = _sorted_counts(pass_rates)
    measured = total > 0
    m_idx = np.flatnonzero(measured)
    weights = compute_weights(correct[m_idx], total[m_idx], scheme)
    positive = weights > 0
    keep, kept_w = m_idx[positive], weights[positive]
    rng = _rng(seed, epoch)
    if mode == "weighted-loss":
        order = rng.permutation(len(keep))
        chosen = keep[order]
        w = kept_w[order] / kept_w.mean() if len(kept_w) else kept_w
    else:
        draws = len(keep) if num_samples is None else int(num_samples)
        if draws < 0:
            raise InputError(f"`num_samples` must be >= 0, got {num_samples}")
        if len(keep) == 0 and draws > 0:
            raise InputError("no problem has a positive weight: nothing to sample")
        pick = rng.choice(len(keep), size=draws, replace=True, p=kept_w / kept_w.sum()) if draws else []
        chosen = keep[np.asarray(pick, dtype=np.int64)]
        w = np.ones(len(chosen))
    items = pa.table({
        "position": pa.array(np.arange(len(chosen), dtype=np.int64)),
        "problem_id": ids.take(pa.array(chosen, pa.int64())),
        "weight": pa.array(w, pa.float64()),
        "pass_rate": pa.array(correct[chosen] / total[chosen], pa.float64()),
        "n": pa.array(samples[chosen], pa.int64()),
    }, schema=MANIFEST_SCHEMA)
    return Manifest(
        items=items, epoch=epoch, seed=seed, mode=mode, scheme=scheme,
        measured=int(measured.sum()), unmeasured=int((~measured).sum()),
        zero_weight=int((~positive).sum()), effective_sample_size=effective_sample_size(kept_w),
    )


def shard_bounds(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard; the last one may be short. No items → no shards."""
    if shard_size < 1:
        raise InputError(f"`shard_size` must be >= 1, got {shard_size}", detail={"field": "shard_size"})
    return [(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def starvation_warning(manifest: Manifest, share: float = 0.5) -> str | None:
    """A warning when an exact-zero scheme leaves more than `share` of the measured pool untrained."""
    if manifest.scheme.guard != "none" or manifest.scheme.name not in ("paced", "hard-filter"):
        return None
    if manifest.measured == 0 or manifest.zero_weight <= share * manifest.measured:
        return None
    return (f"{manifest.zero_weight:,} of {manifest.measured:,} measured problems "
            f"({manifest.zero_weight / manifest.measured:.0%}) get weight 0 and will not be trained on. "
            "With teacher references those problems still teach, and a refreshing loop can stall on "
            "them (docs/results.md); consider the paced-posterior scheme or a uniform mix.")
