"""What the trainer's progress records about measuring: re-measurements, a pending one, evals.

Each is written into trainer_state.json (and the run's summary) with `to_json` under the keys
it has always had, and read back with `from_json`, so a checkpoint written by an earlier paced
resumes; one that lacks a needed key fails with a message naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from paced.errors import InputError

EVERY, STAGE, GROUP = "every", "stage", "samples"  # GROUP: a snapshot from the training samples
T = TypeVar("T")


def _from_json(cls: type[T], data: dict, what: str) -> T:
    """`cls` from the keys of `data` that are its fields (the rest, where `cls` has an `extra`
    field, in `extra`); InputError naming a missing one."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in names.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"trainer_state.json: {what} lacks {', '.join(missing)} (written by another paced "
                         "version?); train into a new --out")
    known = {k: v for k, v in data.items() if k in names and k != "extra"}
    if "extra" in names:
        known["extra"] = {k: v for k, v in data.items() if k not in names}
    return cls(**known)


def _to_json(record: object) -> dict:
    """The record's fields, its `extra` figures flattened back in beside them."""
    data = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return {**{k: v for k, v in data.items() if k != "extra"}, **data.get("extra", {})}


@dataclass(frozen=True)
class PendingRemeasure:
    """A re-measurement whose checkpoint is saved but whose snapshot and source may not be."""

    kind: str  # EVERY (--refresh-every), STAGE (--refresh-between-stages) or GROUP (--group-snapshot-every)
    step: int
    stage: int
    round: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> PendingRemeasure | None:
        return None if data is None else _from_json(cls, data, "pending_refresh")


@dataclass(frozen=True)
class RemeasureRecord:
    """One re-measurement: which checkpoint was rolled out, the snapshot it made, its cost, and
    the data source training went on with (the `Remeasure` hook's answer)."""

    kind: str
    step: int
    round: int
    checkpoint: str
    checkpoint_id: str | None  # GROUP with no sample since the last snapshot: None
    student_id: str  # the lineage
    snapshot_id: str
    previous_snapshot_id: str
    dataset: str
    sampling_hash: str | None
    rerolled: int
    carried: int
    stale_age_max: Any
    stale_age_mean: Any
    rollout_samples: int
    rollout_tokens: int
    rollout_seconds: float
    backend: str | None  # GROUP: None (nothing was rolled out)
    source: str
    refresh_seconds: float = 0.0  # the whole re-measurement, save to new source
    # present only where they apply (left out of the JSON when None):
    after_stage: int | None = None  # STAGE: the stage that ended
    frontier: dict | None = None  # the new snapshot's frontier (training logs)
    carry_over_decay: float | None = None  # --carry-over-decay: λ and the carried evidence share
    carried_share_mean: float | None = None
    sample_steps: list[int] | None = None  # GROUP: the first and last step whose samples it used
    samples: int | None = None  # GROUP: samples and their tokens in the snapshot
    sample_tokens: int | None = None
    extra: dict = field(default_factory=dict)  # what else the hook reported, kept as it said

    OPTIONAL = ("after_stage", "frontier", "carry_over_decay", "carried_share_mean", "sample_steps",
                "samples", "sample_tokens")

    def to_json(self) -> dict:
        return {k: v for k, v in _to_json(self).items() if not (k in self.OPTIONAL and v is None)}

    @classmethod
    def from_json(cls, data: dict) -> RemeasureRecord:
        return _from_json(cls, data, "a refresh record")


@dataclass(frozen=True)
class EvalPoint:
    """One point of the --eval-every curve: greedy held-out accuracy and the compute so far."""

    step: int
    accuracy: float | None
    by_difficulty: dict = field(default_factory=dict)
    problems: int = 0
    train_tokens: int = 0
    rollout_tokens: int = 0
    generated_tokens: int = 0  # sampled from the student while training (on-policy, group)
    flops: float | None = None  # training, sampling and rollouts so far (paced/trainer/flops.py)
    train_seconds: float = 0.0
    seconds: float = 0.0  # the evaluation itself
    extra: dict = field(default_factory=dict)  # the evaluator's other figures, kept as it said

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> EvalPoint:
        return _from_json(cls, data, "an eval point")
