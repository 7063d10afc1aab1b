"""Summaries of pass rates: counts, mean, shares at 0 and 1, a 10-bin histogram. Pure numpy.

`passrate_summary` is what `paced passrates show --json`, the rollout job's summary and the
service's `GET /v1/students/{id}/passrates` report. Problems with n == 0 (never rolled out) are
counted as `unmeasured` and left out of every other figure.
"""

from __future__ import annotations

import numpy as np

from paced.errors import InputError

HISTOGRAM_BINS = 10


def histogram_bin(pass_rate: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Bin index of each pass rate: [0, 0.1) -> 0, ..., [0.9, 1.0] -> 9 (p = 1 in the last bin)."""
    return np.minimum(np.floor(np.asarray(pass_rate, dtype=np.float64) * bins), bins - 1).astype(np.int64)


def passrate_summary(pass_rate: np.ndarray, n: np.ndarray) -> dict:
    """Summary of per-problem pass rates measured with `n` rollouts each.

    Keys: problems (measured), unmeasured, rollouts (Σn), mean_pass_rate (unweighted mean over
    problems; None if none), share_zero, share_one, histogram (10 counts over [0, 1], p = 1.0
    in the last bin) and bin_edges (11 numbers).
    """
    pass_rate = np.asarray(pass_rate, dtype=np.float64)
    n = np.asarray(n, dtype=np.int64)
    if pass_rate.shape != n.shape or pass_rate.ndim != 1:
        raise InputError(f"pass_rate and n must be 1-d arrays of one length, got {pass_rate.shape} and "
                         f"{n.shape}")
    measured = n > 0
    p = pass_rate[measured]
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise InputError("pass rates must lie in [0, 1]")
    count = int(p.size)
    histogram = (np.bincount(histogram_bin(p), minlength=HISTOGRAM_BINS) if count
                 else np.zeros(HISTOGRAM_BINS, int))
    return {
        "problems": count,
        "unmeasured": int((~measured).sum()),
        "rollouts": int(n[measured].sum()),
        "mean_pass_rate": float(p.mean()) if count else None,
        "share_zero": float((p == 0).mean()) if count else None,
        "share_one": float((p == 1).mean()) if count else None,
        "histogram": [int(c) for c in histogram],
        "bin_edges": [round(i / HISTOGRAM_BINS, 10) for i in range(HISTOGRAM_BINS + 1)],
    }


def text_histogram(summary: dict, width: int = 40) -> str:
    """The summary's histogram as text bars, one line per bin."""
    counts, edges = summary["histogram"], summary["bin_edges"]
    top = max(counts) or 1
    lines = []
    for i, c in enumerate(counts):
        close = "]" if i == len(counts) - 1 else ")"
        bar = "#" * round(width * c / top)
        lines.append(f"[{edges[i]:.1f}, {edges[i + 1]:.1f}{close} {c:>8}  {bar}")
    return "\n".join(lines)
