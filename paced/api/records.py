"""The service's typed nouns: runs, epochs and their plan segments, leases and their outcomes.
Plain frozen dataclasses; `state.py` reads and writes them, `runs.py` and the routes use them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    created_at: float
    student_id: str
    dataset: str
    snapshot_id: str  # the snapshot epoch 0 was built from
    config: dict
    epochs: int
    current_epoch: int


@dataclass(frozen=True)
class EpochRecord:
    """What the state database needs to know of a materialised epoch (its segment 0)."""

    epoch: int
    snapshot_id: str
    items: int
    shards: int
    shard_size: int
    effective_sample_size: float
    student_ids: tuple[str, ...] = ()  # the checkpoints that measured the snapshot's rows
    checkpoint_id: str | None = None  # the lineage's newest checkpoint, when the snapshot records it
    warnings: tuple[str, ...] = ()  # for whoever created it (not stored)


@dataclass(frozen=True)
class Replan:
    """A re-plan being built: the never-leased shards of `epoch` from `from_shard` on, planned
    again from `snapshot_id`, become plan segment `segment`."""

    run_id: str
    epoch: int
    segment: int
    from_shard: int
    snapshot_id: str


@dataclass(frozen=True)
class SegmentRecord:
    """A re-plan as built: its own items and shards, and who measured its snapshot."""

    replan: Replan
    items: int
    shards: int
    effective_sample_size: float
    student_ids: tuple[str, ...]
    checkpoint_id: str | None


@dataclass(frozen=True)
class Lease:
    lease_id: str
    run_id: str
    epoch: int
    shard: int
    consumer: str
    expires_at: float
    segment: int = 0  # the plan segment the shard belongs to


@dataclass(frozen=True)
class LeaseOutcome:
    """`leased` (with `lease`), `wait` (every open shard is under a live lease: retry after
    `retry_after_seconds`), `done` (every shard of the last epoch acked), `next_epoch` (every
    shard of the current epoch acked and the run has more: create `next_epoch`), or `replan`
    (a newer snapshot: build `replan`, the never-leased shards wait for it)."""

    status: str
    lease: Lease | None = None
    retry_after_seconds: float | None = None
    next_epoch: int | None = None
    replan: Replan | None = None


@dataclass(frozen=True)
class Ack:
    lease_id: str
    run_id: str
    epoch: int
    shard: int
    already_acked: bool


@dataclass(frozen=True)
class Renewal:
    lease_id: str
    run_id: str
    epoch: int
    shard: int
    expires_at: float
