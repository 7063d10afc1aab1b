"""The service's own state database (`home/service/state.duckdb`): runs, epochs, shards, leases.

One DuckDB connection per process; every write goes through one cursor under one lock, inside a
DuckDB transaction, so lease and ack are serialised read-modify-writes that either commit
whole or not at all. Reads take their own cursor. The lease state machine, per shard:

    free ──lease──► leased(L, expires_at) ──ack by L──► acked(L)
                      │  ▲
                      └──┘ expired, leased again as M: L's ack is now a 409

- lease: the lowest shard of the run's current epoch that is free or whose lease expired.
- ack of L on shard k: acked by L → idempotent; acked by M ≠ L → 409; held by M ≠ L (L expired
  and k was re-leased) → 409; else (L live, or expired but k not re-leased) → acked.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from paced.errors import ConflictError, NotFoundError, PacedError
from paced.store.sql import connect, statement

TABLES = ("service.create_runs", "service.create_epochs", "service.create_shards", "service.create_leases")


class Unavailable(PacedError):
    code = "unavailable"
    status = 503


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
    """What the state database needs to know of a materialised epoch."""

    epoch: int
    snapshot_id: str
    items: int
    shards: int
    shard_size: int
    effective_sample_size: float


@dataclass(frozen=True)
class Lease:
    lease_id: str
    run_id: str
    epoch: int
    shard: int
    consumer: str
    expires_at: float
    items: int


@dataclass(frozen=True)
class LeaseOutcome:
    """`leased` (with `lease`), `wait` (every open shard is under a live lease: retry after
    `retry_after_seconds`), `done` (every shard of the last epoch acked), or `next_epoch`
    (every shard of the current epoch acked and the run has more: create `next_epoch`)."""

    status: str
    lease: Lease | None = None
    retry_after_seconds: float | None = None
    next_epoch: int | None = None


@dataclass(frozen=True)
class Ack:
    lease_id: str
    run_id: str
    epoch: int
    shard: int
    already_acked: bool


def _not_found_run(run_id: str) -> NotFoundError:
    return NotFoundError(f"run {run_id!r} not found", detail={"field": "run_id", "value": run_id})


class StateDB:
    """The service's state. `clock` returns Unix seconds (injectable for tests)."""

    def __init__(self, path: Path, clock: Callable[[], float]):
        self.path, self._clock = path, clock
        self._lock = threading.Lock()
        self._con = None
        self.open()

    def open(self) -> None:
        """Connect (again, after `close`) and create the tables if they are missing."""
        with self._lock:
            if self._con is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                con = connect(self.path)
            except duckdb.Error as err:
                raise PacedError(f"cannot open the service state {self.path}: is another `paced serve` using "
                                 f"this data home? ({err})", code="state_locked") from err
            self._con, self._writer = con, con.cursor()
            for name in TABLES:
                self._writer.execute(statement(name))

    def close(self) -> None:
        """Disconnect (DuckDB checkpoints its write-ahead log on close); a no-op when closed."""
        with self._lock:
            if self._con is None:
                return
            self._writer.close()
            self._con.close()
            self._con = None

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._lock:
            if self._con is None:
                raise Unavailable("the service is shutting down; retry shortly")
            cur = self._writer
            cur.begin()
            try:
                yield cur
            except BaseException:
                cur.rollback()
                raise
            cur.commit()

    @contextmanager
    def _reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self._con
        if con is None:
            raise Unavailable("the service is shutting down; retry shortly")
        cur = con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @staticmethod
    def _fetch_run(cur, run_id: str) -> RunRecord:
        row = cur.execute(statement("service.get_run"), {"run_id": run_id}).fetchone()
        if row is None:
            raise _not_found_run(run_id)
        return RunRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7])

    @staticmethod
    def _insert_epoch(cur, run_id: str, epoch: EpochRecord, now: float) -> None:
        cur.execute(statement("service.insert_epoch"), {
            "run_id": run_id, "epoch": epoch.epoch, "snapshot_id": epoch.snapshot_id, "items": epoch.items,
            "shards": epoch.shards, "ess": epoch.effective_sample_size, "created_at": now})
        cur.execute(statement("service.insert_shards"), {
            "run_id": run_id, "epoch": epoch.epoch, "shards": epoch.shards, "items": epoch.items,
            "shard_size": epoch.shard_size})

    def insert_run(self, record: RunRecord, epoch0: EpochRecord) -> None:
        with self._transaction() as cur:
            cur.execute(statement("service.insert_run"), {
                "run_id": record.run_id, "created_at": record.created_at, "student_id": record.student_id,
                "dataset": record.dataset, "snapshot_id": record.snapshot_id,
                "config": json.dumps(record.config, sort_keys=True), "epochs": record.epochs})
            self._insert_epoch(cur, record.run_id, epoch0, record.created_at)

    def add_epoch(self, run_id: str, epoch: EpochRecord) -> bool:
        """Record `epoch` as the run's current one; False if the run is already there."""
        with self._transaction() as cur:
            if self._fetch_run(cur, run_id).current_epoch >= epoch.epoch:
                return False
            self._insert_epoch(cur, run_id, epoch, self._clock())
            cur.execute(statement("service.set_current_epoch"), {"run_id": run_id, "epoch": epoch.epoch})
        return True

    def get_run(self, run_id: str) -> RunRecord:
        with self._reader() as cur:
            return self._fetch_run(cur, run_id)

    def lease(self, run_id: str, consumer: str, ttl_seconds: float) -> LeaseOutcome:
        now = self._clock()
        with self._transaction() as cur:
            run = self._fetch_run(cur, run_id)
            key = {"run_id": run_id, "epoch": run.current_epoch}
            row = cur.execute(statement("service.next_shard"), {**key, "now": now}).fetchone()
            if row is not None:
                lease = Lease("l-" + secrets.token_hex(8), run_id, run.current_epoch, row[0], consumer,
                              now + ttl_seconds, row[1])
                params = {**key, "shard": lease.shard, "lease_id": lease.lease_id, "expires_at": lease.expires_at}
                cur.execute(statement("service.lease_shard"), params)
                cur.execute(statement("service.insert_lease"), {**params, "consumer": consumer, "now": now})
                return LeaseOutcome("leased", lease=lease)
            live, soonest, open_ = cur.execute(statement("service.epoch_open"), {**key, "now": now}).fetchone()
        if live:
            return LeaseOutcome("wait", retry_after_seconds=max(soonest - now, 0.0))
        if open_ == 0 and run.current_epoch + 1 < run.epochs:
            return LeaseOutcome("next_epoch", next_epoch=run.current_epoch + 1)
        return LeaseOutcome("done")

    def ack(self, run_id: str, lease_id: str) -> Ack:
        now = self._clock()
        with self._transaction() as cur:
            row = cur.execute(statement("service.get_lease"), {"lease_id": lease_id}).fetchone()
            if row is None or row[0] != run_id:
                raise NotFoundError(f"run {run_id!r} has no lease {lease_id!r}",
                                    detail={"field": "lease_id", "value": lease_id})
            key = {"run_id": run_id, "epoch": row[1], "shard": row[2]}
            state, holder, _ = cur.execute(statement("service.get_shard"), key).fetchone()
            ack = Ack(lease_id, run_id, row[1], row[2], already_acked=state == "acked" and holder == lease_id)
            if ack.already_acked:
                return ack
            if holder != lease_id:
                what = "acked under" if state == "acked" else "handed out again as"
                raise ConflictError(
                    f"lease {lease_id} expired and shard {row[2]} of epoch {row[1]} was {what} lease {holder}; "
                    "discard the work done on it", code="lease_superseded",
                    detail={"field": "lease_id", "value": lease_id, "epoch": row[1], "shard": row[2]})
            cur.execute(statement("service.ack_shard"), {**key, "lease_id": lease_id, "now": now})
            cur.execute(statement("service.ack_lease"), {"lease_id": lease_id, "now": now})
        return ack

    def progress(self, run_id: str) -> list[dict]:
        with self._reader() as cur:
            rel = cur.execute(statement("service.progress"), {"run_id": run_id, "now": self._clock()})
            names = [d[0] for d in rel.description]
            return [dict(zip(names, row)) for row in rel.fetchall()]

    def outstanding_leases(self) -> int:
        with self._reader() as cur:
            return int(cur.execute(statement("service.outstanding_leases"), {"now": self._clock()}).fetchone()[0])
