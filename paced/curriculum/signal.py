"""Gradient signal by pass-rate bin: is the paper's premise true for this student? Pure numpy.

PACED's argument: the distillation gradient of a problem the student never (p̂ = 0) or always
(p̂ = 1) solves carries little signal — its per-problem gradients are noise around a small mean.
Given per-problem gradients (sketched to D dimensions) grouped by bin, this measures per bin

- `snr`: ‖μ‖² / tr Σ, the squared norm of the bin's mean gradient over the total variance of
  its problems' gradients, estimated without bias: (‖ḡ‖² − tr Σ̂ / n) / tr Σ̂ with
  tr Σ̂ = Σ‖gᵢ − ḡ‖² / (n − 1). ‖ḡ‖² alone carries tr Σ / n of noise, so pure noise would read
  ≈ 1/n; the estimate reads ≈ 0 for noise at any n (it can dip below 0), so bins of different
  sizes compare fairly;
- `alignment_sd`: the bootstrap standard deviation of the alignment over the bin's problems
  (resampled with replacement, seeded), so the verdict can tell a difference from noise;
- `alignment`: cos(ḡ, g_heldout), how well the bin's mean gradient points where the held-out
  set's gradient does (a descent step along ḡ lowers the held-out loss when it is > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paced.errors import InputError

BINS = ("zero", "low", "mid", "high", "one")  # p̂ = 0, (0, ⅓], (⅓, ⅔), [⅔, 1), 1
BIN_LABELS = {"zero": "p̂ = 0", "low": "0 < p̂ ≤ ⅓", "mid": "⅓ < p̂ < ⅔", "high": "⅔ ≤ p̂ < 1",
              "one": "p̂ = 1"}


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
    alignment_sd: float | None = None  # bootstrap sd of the alignment over the bin's problems


MIN_PROBLEMS = 4  # fewer problems in a bin: no SNR (the estimate would be mostly noise)
BOOTSTRAP = 200


def _cosines(means: np.ndarray, h: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(means, axis=-1) * np.linalg.norm(h)
    return np.divide(means @ h, norms, out=np.zeros(means.shape[:-1]), where=norms > 0)


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
        rng = np.random.default_rng(n)  # seeded: the same gradients give the same spread
        picks = rng.integers(0, n, size=(BOOTSTRAP, n))
        spread = float(np.std(_cosines(g[picks].mean(axis=1), h)))
        return BinSignal(name, int(n), snr, alignment, float(np.sqrt(signal)), spread)
    return BinSignal(name, int(n), snr, alignment, float(np.sqrt(signal)))


def verdict(signals: list[BinSignal]) -> str:
    """One line: do never-solved problems carry a signal worth keeping, compared with the frontier?

    With a held-out direction the alignment decides (a bin whose mean gradient points toward the
    held-out set is worth training on, however noisy each of its problems is), a difference
    counting only beyond two bootstrap standard errors; the SNR decides otherwise."""
    by = {s.bin: s for s in signals if s.snr is not None}
    middle = [by[b] for b in ("low", "mid", "high") if b in by]
    if not middle:
        return "too few frontier problems (0 < p̂ < 1) to compare: measure more problems or a larger K"
    zero = by.get("zero")
    if zero is None:
        return "too few problems at p̂ = 0 to judge them: the schemes differ little for this pool"
    ref_snr = float(np.mean([s.snr for s in middle]))
    aligned = [s for s in middle if s.alignment is not None]
    if zero.alignment is not None and aligned:
        ref = float(np.mean([s.alignment for s in aligned]))
        ref_sd = float(np.sqrt(np.mean([(s.alignment_sd or 0.0) ** 2 for s in aligned]) / len(aligned)))
        sd = float(np.hypot(zero.alignment_sd or 0.0, ref_sd))
        figures = (f"cos {zero.alignment:+.2f} ± {zero.alignment_sd or 0:.2f} vs the frontier's "
                   f"{ref:+.2f} ± {ref_sd:.2f}")
        if zero.alignment <= 2 * (zero.alignment_sd or 0.0):
            return (f"never-solved problems show no held-out-aligned signal beyond noise ({figures}): "
                    "frontier weighting (paced, hard-filter) loses little here")
        if zero.alignment - ref > 2 * sd:
            return ("never-solved problems point toward the held-out set better than the frontier "
                    f"({figures}): an "
                    "exact zero at p̂ = 0 throws that away — prefer paced-posterior or uniform")
        if ref - zero.alignment > 2 * sd:
            return (f"never-solved problems help the held-out set less than the frontier ({figures}): "
                    "frontier weighting (paced, hard-filter) fits this student")
        return ("never-solved problems point toward the held-out set about as well as the frontier "
                f"({figures}; "
                "equal within noise): an exact zero at p̂ = 0 discards a useful signal — prefer "
                "paced-posterior or uniform")
    if zero.snr >= 0.5 * ref_snr and zero.snr > 0:
        return (f"never-solved problems carry a coherent signal here (SNR {zero.snr:.3f} vs the frontier's "
                f"{ref_snr:.3f}): prefer paced-posterior or uniform over an exact zero at p̂ = 0")
    return (f"never-solved problems carry little coherent signal next to the frontier (SNR {zero.snr:.3f} vs "
            f"{ref_snr:.3f}): frontier weighting (paced, hard-filter) fits this student")
