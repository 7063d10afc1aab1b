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
  the shard since) → "ack".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paced.errors import ConflictError


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
    next_fresh: int = 0  # every shard below it has been granted at least once
    open_leased: set[int] = field(default_factory=set)  # granted and not acked
    acked: int = 0

    def __post_init__(self):
        if not self.holder:
            self.holder = [None] * self.shards
            self.expires_at = [0.0] * self.shards
            self.acked_by = [None] * self.shards

    def pick(self, now: float) -> int | None:
        expired = [k for k in self.open_leased if self.expires_at[k] <= now]
        candidates = expired + ([self.next_fresh] if self.next_fresh < self.shards else [])
        return min(candidates) if candidates else None

    def grant(self, shard: int, lease_id: str, expires_at: float) -> None:
        if self.acked_by[shard] is not None:
            raise ValueError(f"shard {shard} is acked; it is never granted again")
        self.holder[shard], self.expires_at[shard] = lease_id, expires_at
        self.leases[lease_id] = shard
        self.open_leased.add(shard)
        self.next_fresh = max(self.next_fresh, shard + 1)

    def check_ack(self, lease_id: str) -> str:
        """"ack" or "already"; ConflictError if the shard belongs to another lease."""
        shard = self.leases[lease_id]
        if self.acked_by[shard] == lease_id:
            return "already"
        other = self.acked_by[shard] or self.holder[shard]
        if other != lease_id:
            what = "acked under" if self.acked_by[shard] else "handed out again as"
            raise ConflictError(
                f"lease {lease_id} expired and shard {shard} of epoch {self.epoch} was {what} lease {other}; "
                "discard the work done on it", code="lease_superseded",
                detail={"field": "lease_id", "value": lease_id, "epoch": self.epoch, "shard": shard})
        return "ack"

    def record_ack(self, shard: int, lease_id: str) -> None:
        self.acked_by[shard] = lease_id
        self.open_leased.discard(shard)
        self.acked += 1

    def live(self, now: float) -> list[int]:
        return [k for k in self.open_leased if self.expires_at[k] > now]

    @property
    def all_acked(self) -> bool:
        return self.acked == self.shards
