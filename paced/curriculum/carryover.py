"""Carrying pass-rate evidence across refreshes instead of throwing it away.

Each problem keeps discounted Beta counts: at a refresh, the old counts are multiplied by the
decay λ ∈ [0, 1] and the fresh samples added,

    n' = λ·n + n_fresh        c' = λ·c + c_fresh        p̂ = c' / n'

so a checkpoint's estimate leans on its own samples while the earlier checkpoints' (measured on
a slightly different student) still cut the noise. `carried` = λ·n / n' is how much of the
estimate is old evidence (0: all fresh; 1: nothing fresh). λ = 0 is today's refresh (K fresh
samples, nothing kept); λ = 1 never forgets.

Which problems get fresh samples: every problem whose carried estimate is strictly between 0
and 1 (the frontier, where the weight p(1−p) is large and moves), and each settled problem
(p̂ ∈ {0, 1}) with a probability that grows with its age a (refreshes since it last got fresh
samples): 1 − (1 − r)^(a+1) for a base rate r, so a problem just seen settled is rarely
re-probed and one settled long ago almost surely. Draws are seeded per (seed, problem, round),
so a refresh's choice is reproducible and independent of the pool's order.

Pure numpy and Arrow: arrays in, arrays out. In a snapshot the evidence is three columns beside
the integer counts of the fresh samples (`fill_evidence`, `carry_evidence`): `evidence_n`,
`evidence_correct` (float64) and `carried_share`; `pass_rate` = evidence_correct / evidence_n.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from paced.errors import InputError


@dataclass(frozen=True)
class CarryOver:
    """Carry-over settings: decay λ, fresh samples per re-probed problem, settled re-probe rate."""

    decay: float = 0.5
    fresh: int = 4
    reprobe_rate: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.decay <= 1.0:
            raise InputError(f"`decay` must be in [0, 1], got {self.decay}", detail={"field": "decay"})
        if self.fresh < 1:
            raise InputError(f"`fresh` must be >= 1, got {self.fresh}", detail={"field": "fresh"})
        if not 0.0 <= self.reprobe_rate <= 1.0:
            raise InputError(f"`reprobe_rate` must be in [0, 1], got {self.reprobe_rate}",
                             detail={"field": "reprobe_rate"})


def combine_counts(old_correct, old_n, fresh_correct, fresh_n, decay: float):
    """(correct, n, carried): discounted old counts plus fresh ones, and the carried share."""
    if not 0.0 <= decay <= 1.0:
        raise InputError(f"`decay` must be in [0, 1], got {decay}", detail={"field": "decay"})
    oc, on, fc, fn = (np.asarray(x, dtype=np.float64) for x in (old_correct, old_n, fresh_correct, fresh_n))
    if (oc < 0).any() or (oc > on).any() or (fc < 0).any() or (fc > fn).any():
        raise InputError("need 0 <= correct <= n for old and fresh counts")
    kept_n = decay * on
    n = kept_n + fn
    carried = np.divide(kept_n, n, out=np.zeros_like(n), where=n > 0)
    return decay * oc + fc, n, carried


def reprobe_probability(age, rate: float) -> np.ndarray:
    """Chance that a settled problem of age `age` (refreshes since its last fresh samples) is
    re-probed: 1 − (1 − rate)^(age + 1), growing with age towards 1."""
    age = np.asarray(age, dtype=np.float64)
    if (age < 0).any():
        raise InputError("ages must be >= 0")
    return 1.0 - np.power(1.0 - rate, age + 1.0)


def uniform_draws(problem_ids: list[str], seed: int, round_index: int) -> np.ndarray:
    """One uniform [0, 1) number per problem, fixed by (seed, problem id, round)."""
    out = np.empty(len(problem_ids))
    for i, pid in enumerate(problem_ids):
        digest = hashlib.sha256(f"{seed}:{round_index}:{pid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def select_fresh(problem_ids: list[str], correct, n, age, rate: float, seed: int,
                 round_index: int) -> np.ndarray:
    """Which problems get fresh samples this round (a boolean mask, see the module doc):
    unmeasured (n = 0) and frontier problems always; settled ones by their age."""
    c, n = np.asarray(correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    p = np.divide(c, n, out=np.zeros_like(n), where=n > 0)
    settled = (n > 0) & ((p <= 0) | (p >= 1))
    draw = uniform_draws(problem_ids, seed, round_index)
    return ~settled | (draw < reprobe_probability(age, rate))


@dataclass(frozen=True)
class Evidence:
    """Per problem: discounted counts, refreshes since fresh samples, and the carried share."""

    correct: np.ndarray
    n: np.ndarray
    age: np.ndarray
    carried: np.ndarray

    @classmethod
    def empty(cls, size: int) -> Evidence:
        zeros = np.zeros(size)
        return cls(zeros, zeros.copy(), np.zeros(size, dtype=np.int64), zeros.copy())

    @property
    def pass_rate(self) -> np.ndarray:
        return np.divide(self.correct, self.n, out=np.zeros_like(self.n), where=self.n > 0)


def step_evidence(previous: Evidence, chosen: np.ndarray, fresh_correct, fresh_n, decay: float) -> Evidence:
    """The evidence after one refresh: chosen problems combine their fresh counts with the
    discounted old ones (age 0); the others keep their counts undiscounted, one refresh older."""
    chosen = np.asarray(chosen, dtype=bool)
    fc = np.where(chosen, np.asarray(fresh_correct, dtype=np.float64), 0.0)
    fn = np.where(chosen, np.asarray(fresh_n, dtype=np.float64), 0.0)
    c, n, carried = combine_counts(previous.correct, previous.n, fc, fn, decay)
    return Evidence(correct=np.where(chosen, c, previous.correct), n=np.where(chosen, n, previous.n),
                    age=np.where(chosen, 0, previous.age + 1),
                    carried=np.where(chosen, carried, np.where(previous.n > 0, 1.0, 0.0)))


# ---------------------------------------------------------------- the evidence columns of a snapshot

def carry_evidence(previous: pa.Table, fresh: pa.Table, decay: float | None) -> pa.Table:
    """The evidence of fresh rows (stale_age 0, their counts) given a previous snapshot's rows:
    with a decay λ, old evidence × λ + the fresh counts (`combine_counts`), `pass_rate` the
    combined estimate; without (None), the fresh counts alone. Both tables have evidence columns."""
    if decay is None or fresh.num_rows == 0:
        return fresh
    import pyarrow.compute as pc

    at = pc.index_in(fresh["problem_id"],
                     value_set=previous["problem_id"].combine_chunks())  # null: new problem
    found = pc.is_valid(at).to_numpy(zero_copy_only=False)
    rows = pc.fill_null(at, 0).to_numpy(zero_copy_only=False)
    oc, on = (np.where(found, previous[c].to_numpy()[rows] if previous.num_rows else 0.0, 0.0)
              for c in ("evidence_correct", "evidence_n"))
    c, n, carried = combine_counts(oc, on, fresh["correct"].to_numpy(zero_copy_only=False),
                                   fresh["n"].to_numpy(zero_copy_only=False), decay)
    p = np.divide(c, n, out=np.zeros_like(n), where=n > 0)
    for name, values in (("evidence_correct", c), ("evidence_n", n), ("carried_share", carried),
                         ("pass_rate", p)):
        fresh = fresh.set_column(fresh.schema.get_field_index(name), name, pa.array(values, pa.float64()))
    return fresh
