"""Where a student's frontier stands: shares at p̂ = 0, 0 < p̂ < 1 and p̂ = 1, staleness, and the
weight a scheme gives along p. Pure numpy: what the dashboard, /metrics and the trainer's logs show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from paced.curriculum.weights import WeightScheme, compute_weights


@dataclass(frozen=True)
class Frontier:
    """One snapshot's frontier: measured problems and their split by pass rate, plus staleness
    (how many rows were carried from earlier refreshes instead of measured on this checkpoint)."""

    problems: int
    zero: int  # p̂ = 0: never solved
    mid: int  # 0 < p̂ < 1: the frontier
    one: int  # p̂ = 1: always solved
    mean_pass_rate: float | None
    carried: int  # rows with stale_age > 0
    max_stale_age: int
    carried_share: float | None = None  # mean share of the estimates carried (carry-over evidence)

    def share(self, part: str) -> float | None:
        return getattr(self, part) / self.problems if self.problems else None


def compute_frontier(pass_rate, n, stale_age=None, carried_share=None) -> Frontier:
    """The frontier of measured rows (n > 0); unmeasured rows are left out. `carried_share`
    (per row, default: 1 for a stale row, else 0) is averaged."""
    p = np.asarray(pass_rate, dtype=np.float64)
    measured = np.asarray(n) > 0
    p = p[measured]
    age = np.zeros_like(p, dtype=np.int64) if stale_age is None else np.asarray(stale_age, np.int64)[measured]
    share = ((age > 0).astype(np.float64) if carried_share is None
             else np.asarray(carried_share, np.float64)[measured])
    return Frontier(problems=int(p.size), zero=int((p == 0).sum()), mid=int(((p > 0) & (p < 1)).sum()),
                    one=int((p == 1).sum()), mean_pass_rate=float(p.mean()) if p.size else None,
                    carried=int((age > 0).sum()), max_stale_age=int(age.max()) if age.size else 0,
                    carried_share=float(share.mean()) if share.size else None)


def weight_curve(scheme: WeightScheme, k: int = 8) -> list[tuple[float, float]]:
    """(p̂ = c/k, weight scaled to a maximum of 1) for c = 0..k: the scheme's weight at each pass
    rate K samples can measure (the guards are left out: they depend on the whole pool)."""
    c = np.arange(k + 1, dtype=np.float64)
    bare = WeightScheme(name=scheme.name, alpha=scheme.alpha, beta=scheme.beta, prior=scheme.prior)
    w = compute_weights(c, np.full_like(c, k), bare)
    top = float(w.max()) if w.size and w.max() > 0 else 1.0
    return [(float(ci / k), float(wi / top)) for ci, wi in zip(c, w, strict=True)]


def snapshot_time(snapshot_id: str) -> datetime | None:
    """The creation time a snapshot id starts with (`YYYYMMDDTHHMMSSffffffZ-…`), None if it does not."""
    try:
        return datetime.strptime(snapshot_id.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
