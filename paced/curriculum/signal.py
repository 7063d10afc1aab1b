"""Gradient signal by pass-rate bin: is the paper's premise true for this student? Pure numpy.

PACED's argument: the distillation gradient of a problem the student never (p̂ = 0) or always
(p̂ = 1) solves carries little signal — its per-problem gradients are noise around a small mean.
Given per-problem gradients (sketched to D dimensions) grouped by bin, this measures per bin

- `snr`: ‖μ‖² / tr Σ, the squared norm of the bin's mean gradient over the total variance of
  its problems' gradients, estimated without bias: (‖ḡ‖² − tr Σ̂ / n) / tr Σ̂ with
  tr Σ̂ = Σ‖gᵢ − ḡ‖² / (n − 1). ‖ḡ‖² alone carries tr Σ / n of noise, so pure noise would read
  ≈ 1/n; the estimate reads ≈ 0 for noise at any n (it can dip below 0), so bins of different
  sizes compare fairly;
- `alignment`: cos(ḡ, g_heldout), how well the bin's mean gradient points where the held-out
  set's gradient does (a descent step along ḡ lowers the held-out loss when it is > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paced.errors import InputError

BINS = ("zero", "low", "mid", "high", "one")  # p̂ = 0, (0, ⅓], (⅓, ⅔), [⅔, 1), 1
BIN_LABELS = {"zero": "p̂ = 0", "low": "0 < p̂ ≤ ⅓", "mid": "⅓ < p̂ < ⅔", "high": "⅔ ≤ p̂ < 1", "one": "p̂ = 1"}


def pass_rate_bin(pass_rate) -> np.ndarray:
    """The BINS name of each pass rate."""
    p = np.asarray(pass_rate, dtype=np.float64)
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise InputError("pass rates must lie in [0, 1]")
    out = np.where(p <= 1 / 3, "low", np.where(p < 2 / 3, "mid", "high")).astype(object)
    out[p == 0], out[p == 1] = "zero", "one"
    return out


@dataclass(frozen=True)
class BinSignal:
    bin: str
    problems: int
    snr: float | None
    alignment: float | None  # cosine with the held-out gradient
    mean_norm: float | None


MIN_PROBLEMS = 4  # fewer problems in a bin: no SNR (the estimate would be mostly noise)


def compute_bin_signal(name: str, grads: np.ndarray, heldout: np.ndarray | None) -> BinSignal:
    """SNR and alignment of one bin's per-problem gradients [n, D] (n ≥ MIN_PROBLEMS)."""
    g = np.asarray(grads, dtype=np.float64)
    if g.ndim != 2:
        raise InputError(f"gradients must be [problems, dimensions], got shape {g.shape}")
    n = g.shape[0]
    if n < MIN_PROBLEMS:
        return BinSignal(name, int(n), None, None, None)
    mean = g.mean(axis=0)
    noise = float(((g - mean) ** 2).sum() / (n - 1))  # tr Σ̂
    signal = float(mean @ mean)
    snr = (signal - noise / n) / noise if noise > 0 else float("inf")
    alignment = None
    if heldout is not None:
        h = np.asarray(heldout, dtype=np.float64)
        denominator = np.sqrt(signal) * np.linalg.norm(h)
        alignment = float(mean @ h / denominator) if denominator > 0 else None
    return BinSignal(name, int(n), snr, alignment, float(np.sqrt(signal)))


def verdict(signals: list[BinSignal]) -> str:
    """One line: do the ends of the pass-rate range carry a coherent signal, compared with the middle?"""
    by = {s.bin: s for s in signals if s.snr is not None}
    middle = [by[b] for b in ("low", "mid", "high") if b in by]
    if not middle:
        return "too few frontier problems (0 < p̂ < 1) to compare: measure more problems or a larger K"
    ref_snr = float(np.mean([s.snr for s in middle]))
    ref_align = np.mean([s.alignment for s in middle if s.alignment is not None] or [np.nan])
    parts = []
    for end, name in (("zero", "never-solved"), ("one", "always-solved")):
        s = by.get(end)
        if s is None:
            continue
        coherent = s.snr >= 0.5 * ref_snr and s.snr > 0 and (s.alignment is None or np.isnan(ref_align)
                                               or s.alignment >= 0.5 * ref_align)
        parts.append((name, coherent))
    if not parts:
        return "no problems at p̂ = 0 or p̂ = 1: every scheme weights the same problems here"
    if parts[0][0] == "never-solved" and parts[0][1]:
        return ("never-solved problems carry a coherent signal here (SNR and held-out alignment close to the "
                "frontier's): prefer paced-posterior or uniform over an exact zero at p̂ = 0")
    if all(not c for _, c in parts):
        return ("the ends carry little coherent signal next to the frontier: frontier weighting "
                "(paced, hard-filter) fits this student")
    return "; ".join(f"{n} problems: {'coherent' if c else 'weak'} signal" for n, c in parts) + \
        " (compared with 0 < p̂ < 1)"
