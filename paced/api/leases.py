"""The lease state machine of one epoch: pure, no I/O. `state.py` mirrors the database's
leases and acks of each run's current epoch into one of these, decides here, and writes the
decision down before applying it.

Per shard:

    free ──grant L──► leased(L, expires_at) ──ack by L──► acked(L)
                        │  ▲
                        └──┘ L expired: granted again as M, after which L's ack is a conflict

- `pick(now)`: the lowest shard that is free or whose lease expired (None if there is none).
- `check_ack(L)`: acked by L → "already" (idempotent); acked by M ≠ L → conflict; held by M ≠ L
  (L expired and the shard went out again) → conflict; else (L live, or expired but nobody took
  the shard since) → "ack". `check_renew(L)`: the same, but acked by L is a conflict too.

Shards are granted in order, so the shards ever granted are exactly `[0, next_fresh)`: their
bytes are fixed. The rest (never granted) may be re-planned: `pending` (a re-plan being built)
stops fresh grants meanwhile (expired shards still go out again), and `resize(n)` then makes
the epoch `n` shards long, `next_fresh` unchanged. `starts` and `snapshot_id` describe the plan: where each
segment (the epoch's first plan, then each re-plan) starts, and the snapshot of the newest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paced.errors import ConflictError, ForbiddenError


@dataclass
class EpochLeases:
    """Shard states of one epoch. `holder[k]` is the latest lease granted on shard k."""

    run_id: str
    epoch: int
    shards: int
    holder: list[str | None] = field(default_factory=list)
    expires_at: list[float] = field(default_factory=list)
    acked_by: list[str | None] = field(default_factory=list)
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> shard, this epoch's leases
    consumers: dict[str, str] = field(default_factory=dict)  # lease id -> the consumer it was granted to
    next_fresh: int = 0  # every shard below it has been granted at least once
    open_leased: set[int] = field(default_factory=set)  # granted and not acked
    acked: int = 0
    starts: list[int] = field(default_factory=lambda: [0])  # first shard of each plan segment
    snapshot_id: str | None = None  # the snapshot the newest segment was planned from
    pending: object = None  # the re-plan being built (the service's record of it); freezes fresh grants
    declined: str | None = None  # a snapshot whose re-plan failed: not tried again this epoch

    def __post_init__(self):
        if not self.holder:
            self.holder = [None] * self.shards
            self.expires_at = [0.0] * self.shards
            self.acked_by = [None] * self.shards

    @property
    def frozen(self) -> bool:
        return self.pending is not None

    def pick(self, now: float) -> int | None:
        expired = [k for k in self.open_leased if self.expires_at[k] <= now]
        fresh = self.next_fresh < self.shards and not self.frozen
        candidates = expired + ([self.next_fresh] if fresh else [])
        return min(candidates) if candidates else None

    def grant(self, shard: int, lease_id: str, expires_at: float, consumer: str | None = None) -> None:
        if self.acked_by[shard] is not None:
            raise ValueError(f"shard {shard} is acked; it is never granted again")
        self.holder[shard], self.expires_at[shard] = lease_id, expires_at
        self.leases[lease_id] = shard
        if consumer is not None:
            self.consumers[lease_id] = consumer
        self.open_leased.add(shard)
        self.next_fresh = max(self.next_fresh, shard + 1)

    def check_ack(self, lease_id: str) -> str:
        """"ack" or "already"; ConflictError if the shard belongs to another lease."""
        shard = self.leases[lease_id]
        if self.acked_by[shard] == lease_id:
            return "already"
        self.check_renew(lease_id)
        return "ack"

    def check_renew(self, lease_id: str) -> None:
        """ConflictError unless `lease_id` still holds its shard, unacked (live or expired)."""
        shard = self.leases[lease_id]
        if self.acked_by[shard] == lease_id:
            raise ConflictError(f"lease {lease_id} has acked shard {shard} of epoch {self.epoch}; there is "
                                "nothing to renew", code="lease_acked",
                                detail={"field": "lease_id", "value": lease_id, "epoch": self.epoch,
                                        "shard": shard})
        other = self.acked_by[shard] or self.holder[shard]
        if other != lease_id:
            what = "acked under" if self.acked_by[shard] else "handed out again as"
            raise ConflictError(
                f"lease {lease_id} expired and shard {shard} of epoch {self.epoch} was {what} lease {other}; "
                "discard the work done on it", code="lease_superseded",
                detail={"field": "lease_id", "value": lease_id, "epoch": self.epoch, "shard": shard})

    def check_consumer(self, lease_id: str, consumer: str | None, force: bool) -> None:
        """ForbiddenError when `consumer` names someone other than the lease's consumer (unless
        `force`); a request that names no consumer is not checked (clients before the binding)."""
        check_consumer(lease_id, self.consumers.get(lease_id), consumer, force)

    def renew(self, lease_id: str, expires_at: float) -> None:
        self.expires_at[self.leases[lease_id]] = expires_at

    def record_ack(self, shard: int, lease_id: str) -> None:
        self.acked_by[shard] = lease_id
        self.open_leased.discard(shard)
        self.acked += 1

    def resize(self, shards: int) -> None:
        """The epoch now has `shards` shards; only never-granted ones are added or dropped."""
        if shards < self.next_fresh:
            raise ValueError(f"cannot cut epoch {self.epoch} to {shards} shards: {self.next_fresh} were "
                             "granted")
        extra = shards - self.shards
        for values, fill in ((self.holder, None), (self.expires_at, 0.0), (self.acked_by, None)):
            if extra >= 0:
                values.extend([fill] * extra)
            else:
                del values[shards:]
        self.shards = shards

    def segment_of(self, shard: int) -> int:
        """The plan segment shard `shard` belongs to (the last one starting at or before it)."""
        return max(i for i, start in enumerate(self.starts) if start <= shard)

    def live(self, now: float) -> list[int]:
        return [k for k in self.open_leased if self.expires_at[k] > now]

    @property
    def all_acked(self) -> bool:
        return self.acked == self.shards


def check_consumer(lease_id: str, holder: str | None, consumer: str | None, force: bool) -> None:
    """A lease is acked and renewed by the consumer it was granted to: ForbiddenError (403) when
    `consumer` is another one, unless `force` (e.g. an operator finishing a dead trainer's work)."""
    if consumer is None or force or holder is None or holder == consumer:
        return
    raise ForbiddenError(f"lease {lease_id} was granted to consumer {holder!r}, not {consumer!r}; only its "
                         "consumer may ack or renew it (send force: true to override)",
                         code="lease_not_yours",
                         detail={"field": "consumer", "value": consumer, "lease_id": lease_id})
