"""The service's own state database (`home/service/state.duckdb`): runs, epochs and their plan
segments, leases, acks.

One DuckDB connection per process. Leases and acks are append-only rows (a renewal moves a
lease's expiry); the lease state machine (`leases.EpochLeases`) of each run's current epoch,
with its plan segments, is mirrored in memory, rebuilt from those rows on first use (so after a
restart too). Every write runs on one writer thread (`commit.py`): a
lease or an ack is decided on the mirror, written, committed with its batch, and answered only
then, so answers are durable and a restart loses or doubles nothing. A failed batch drops the
mirrors (they are rebuilt from what was committed). The `acks` primary key (one row per shard)
makes a second ack of a shard impossible even for a bug above it. Reads take their own cursor.

The state is private: `service/` is 0700 and `state.duckdb` 0600. One `paced serve` per data
home holds `service/.lock` (an `flock`) while the database is open; under it, a database file
that a failed first start left empty (0 bytes, e.g. on a full disk) is removed and created
again, and a first start that fails removes the file it began.

A re-plan (runs that follow snapshots) is three steps: a lease that sees a newer snapshot marks
the mirror `pending` (fresh grants stop; the answer says `replan`), the service builds the
segment's files, and `install_segment` records it, but only if no shard was granted meanwhile
(`next_fresh` still at the re-plan's `from_shard`), so the new plan never repeats a problem of a
shard already out. `release_replan` lifts the freeze when a build fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from paced.api.commit import Batch, GroupCommitter, Unavailable
from paced.api.leases import EpochLeases, check_consumer
from paced.api.records import (  # noqa: F401 - re-exported: the nouns the state reads and writes
    Ack,
    EpochRecord,
    Lease,
    LeaseOutcome,
    Renewal,
    Replan,
    RunRecord,
    SegmentRecord,
)
from paced.errors import ConflictError, NotFoundError, PacedError, storage_error
from paced.store.sql import connect, statement

STATE_DIR_MODE, STATE_FILE_MODE = 0o700, 0o600
TABLES = ("service.create_runs", "service.create_epochs", "service.create_segments", "service.create_leases",
          "service.create_acks")


def _not_found_run(run_id: str) -> NotFoundError:
    return NotFoundError(f"run {run_id!r} not found", detail={"field": "run_id", "value": run_id})


class StateDB:
    """The service's state. `clock` returns Unix seconds (injectable for tests)."""

    def __init__(self, path: Path, clock: Callable[[], float]):
        self.path, self._clock = path, clock
        self._lock = threading.Lock()  # guards open/close
        self._con = self._committer = None
        self._runs: dict[str, RunRecord] = {}  # mirrors, touched only on the writer thread
        self._current: dict[str, EpochLeases] = {}
        self.open()

    def open(self) -> None:
        """Connect (again, after `close`), create missing tables, start the writer thread."""
        with self._lock:
            if self._con is not None:
                return
            self._lock_fd = self._take_service_lock()
            try:
                con, writer = self._connect()
            except BaseException:
                os.close(self._lock_fd)
                raise
            self._con, self._writer = con, writer
            self._committer = GroupCommitter(writer, self._drop_mirrors)

    def _take_service_lock(self) -> int:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
            os.chmod(folder, STATE_DIR_MODE)
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, STATE_FILE_MODE)
        except OSError as err:
            raise storage_error(err, "cannot open the service state") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise PacedError(f"another `paced serve` is using the data home of {self.path}; stop it first",
                             code="state_locked") from err
        return fd

    def _connect(self):
        """Open (or create) the database under the service lock; a file this call began is removed
        again if the start fails, so the next start is a clean first start."""
        wal = self.path.with_name(self.path.name + ".wal")
        if self.path.exists() and self.path.stat().st_size == 0:  # a failed first start's leftover
            self.path.unlink()
            wal.unlink(missing_ok=True)
        fresh = not self.path.exists()
        try:
            con = connect(self.path, threads=1)
            os.chmod(self.path, STATE_FILE_MODE)
            writer = con.cursor()
            for name in TABLES:
                writer.execute(statement(name))
            writer.execute("CHECKPOINT")
            return con, writer
        except (duckdb.Error, OSError) as err:
            if fresh:
                self.path.unlink(missing_ok=True)
                wal.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise storage_error(err, "cannot open the service state") from err
            raise PacedError(f"cannot open the service state {self.path}: {str(err).splitlines()[0]}",
                             code="state_unavailable") from err

    def close(self) -> None:
        """Finish queued writes, disconnect (DuckDB checkpoints its log on close); no-op when closed."""
        with self._lock:
            if self._con is None:
                return
            self._committer.stop()
            self._writer.close()
            self._con.close()
            self._con = None
            os.close(self._lock_fd)
            self._drop_mirrors()

    def _drop_mirrors(self) -> None:
        self._runs.clear()
        self._current.clear()

    def _write(self, op):
        committer = self._committer
        if committer is None or self._con is None:
            raise Unavailable("the service is shutting down; retry shortly")
        return committer.submit(op)

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

    # ---- mirrors (writer thread only) -------------------------------------------------------------

    @staticmethod
    def _fetch_run(cur, run_id: str) -> RunRecord:
        row = cur.execute(statement("service.get_run"), {"run_id": run_id}).fetchone()
        if row is None:
            raise _not_found_run(run_id)
        return RunRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7])

    def _run(self, batch: Batch, run_id: str) -> RunRecord:
        run = self._runs.get(run_id)
        if run is None:
            run = self._runs[run_id] = self._fetch_run(batch.sql(), run_id)
        return run

    def _epoch_leases(self, batch: Batch, run: RunRecord) -> EpochLeases:
        """The current epoch's lease states, rebuilt from the leases and acks rows if not mirrored."""
        state = self._current.get(run.run_id)
        if state is not None and state.epoch == run.current_epoch:
            return state
        cur, key = batch.sql(), {"run_id": run.run_id, "epoch": run.current_epoch}
        shards, snapshot_id = cur.execute(statement("service.get_epoch_shards"), key).fetchone()
        state = EpochLeases(run.run_id, run.current_epoch, shards, snapshot_id=snapshot_id)
        segments = cur.execute(statement("service.epoch_segments"), key).fetchall()
        for segment, from_shard, snapshot_id in segments:
            if segment > 0:
                state.starts.append(from_shard)
            state.snapshot_id = snapshot_id
        leases = cur.execute(statement("service.epoch_leases"), key).fetchall()
        for lease_id, shard, expires_at, consumer in leases:
            state.grant(shard, lease_id, expires_at, consumer)
        for shard, lease_id in cur.execute(statement("service.epoch_acks"), key).fetchall():
            state.record_ack(shard, lease_id)
        self._current[run.run_id] = state
        return state

    # ---- writes -----------------------------------------------------------------------------------

    @staticmethod
    def _insert_segment(cur, replan: Replan, items: int, shards: int, ess: float,
                        student_ids: tuple[str, ...], checkpoint_id: str | None, now: float) -> None:
        cur.execute(statement("service.insert_segment"), {
            "run_id": replan.run_id, "epoch": replan.epoch, "segment": replan.segment,
            "from_shard": replan.from_shard, "snapshot_id": replan.snapshot_id, "items": items,
            "shards": shards,
            "ess": ess, "student_ids": json.dumps(list(student_ids)), "checkpoint_id": checkpoint_id,
            "created_at": now})

    @classmethod
    def _insert_epoch(cls, cur, run_id: str, epoch: EpochRecord, now: float) -> None:
        cur.execute(statement("service.insert_epoch"), {
            "run_id": run_id, "epoch": epoch.epoch, "snapshot_id": epoch.snapshot_id, "items": epoch.items,
            "shards": epoch.shards, "ess": epoch.effective_sample_size, "created_at": now})
        cls._insert_segment(cur, Replan(run_id, epoch.epoch, 0, 0, epoch.snapshot_id), epoch.items,
                            epoch.shards,
                            epoch.effective_sample_size, epoch.student_ids, epoch.checkpoint_id, now)

    def insert_run(self, record: RunRecord, epoch0: EpochRecord) -> None:
        def op(batch: Batch):
            cur = batch.sql()
            cur.execute(statement("service.insert_run"), {
                "run_id": record.run_id, "created_at": record.created_at, "student_id": record.student_id,
                "dataset": record.dataset, "snapshot_id": record.snapshot_id,
                "config": json.dumps(record.config, sort_keys=True), "epochs": record.epochs})
            self._insert_epoch(cur, record.run_id, epoch0, record.created_at)

        self._write(op)

    def add_epoch(self, run_id: str, epoch: EpochRecord) -> bool:
        """Record `epoch` as the run's current one; False if the run is already there."""
        def op(batch: Batch):
            run = self._run(batch, run_id)
            if run.current_epoch >= epoch.epoch:
                return False
            cur = batch.sql()
            self._insert_epoch(cur, run_id, epoch, self._clock())
            cur.execute(statement("service.set_current_epoch"), {"run_id": run_id, "epoch": epoch.epoch})
            self._runs[run_id] = RunRecord(**{**run.__dict__, "current_epoch": epoch.epoch})
            self._current.pop(run_id, None)
            return True

        return self._write(op)

    def lease(self, run_id: str, consumer: str, ttl_seconds: float,
              newest_snapshot: str | None = None) -> LeaseOutcome:
        """The next shard for `consumer`. `newest_snapshot`: a snapshot the run's current epoch
        should follow; if it is newer than the plan and some shard was never leased, fresh grants
        stop and the outcome is `replan` (once the shards already out are exhausted)."""
        def op(batch: Batch):
            now = self._clock()
            run = self._run(batch, run_id)
            state = self._epoch_leases(batch, run)
            if (newest_snapshot and not state.frozen and newest_snapshot > (state.snapshot_id or "")
                    and newest_snapshot != state.declined and state.next_fresh < state.shards):
                state.pending = Replan(run_id, state.epoch, len(state.starts), state.next_fresh,
                                       newest_snapshot)
            shard = state.pick(now)
            if shard is None:
                if state.frozen:
                    return LeaseOutcome("replan", replan=state.pending)
                return self._no_free_shard(run, state, now)
            lease = Lease("l-" + secrets.token_hex(8), run_id, run.current_epoch, shard, consumer,
                          now + ttl_seconds, state.segment_of(shard))
            batch.add("service.insert_leases", {
                "lease_id": lease.lease_id, "run_id": run_id, "epoch": lease.epoch, "shard": shard,
                "consumer": consumer, "issued_at": now, "expires_at": lease.expires_at})
            state.grant(shard, lease.lease_id, lease.expires_at, consumer)
            return LeaseOutcome("leased", lease=lease)

        return self._write(op)

    def install_segment(self, record: SegmentRecord) -> None:
        """Record a built re-plan as the epoch's newest segment; ConflictError if the epoch moved on,
        another segment came first, or a shard from `from_shard` on was granted meanwhile."""
        replan = record.replan

        def op(batch: Batch):
            state = self._epoch_leases(batch, self._run(batch, replan.run_id))
            planned = (replan.epoch, replan.segment, replan.from_shard)
            if (state.epoch, len(state.starts), state.next_fresh) != planned:
                raise ConflictError(f"re-plan {replan} no longer fits epoch {state.epoch} of {replan.run_id} "
                                    f"({len(state.starts)} segments, {state.next_fresh} shards out)")
            cur, now = batch.sql(), self._clock()
            self._insert_segment(cur, replan, record.items, record.shards, record.effective_sample_size,
                                 record.student_ids, record.checkpoint_id, now)
            shard_size = self._run(batch, replan.run_id).config["shard_size"]
            cur.execute(statement("service.resize_epoch"), {
                "run_id": replan.run_id, "epoch": replan.epoch, "shards": replan.from_shard + record.shards,
                "items": replan.from_shard * shard_size + record.items})
            state.resize(replan.from_shard + record.shards)
            state.starts.append(replan.from_shard)
            state.snapshot_id, state.pending = replan.snapshot_id, None

        self._write(op)

    def release_replan(self, replan: Replan, decline: bool) -> None:
        """Lift the freeze of a re-plan that was not installed (`decline`: and do not try its
        snapshot again this epoch)."""
        def op(batch: Batch):
            state = self._current.get(replan.run_id)
            if state is not None and state.pending == replan:
                state.pending = None
                if decline:
                    state.declined = replan.snapshot_id

        self._write(op)

    @staticmethod
    def _no_free_shard(run: RunRecord, state: EpochLeases, now: float) -> LeaseOutcome:
        soonest = min((state.expires_at[k] for k in state.live(now)), default=None)
        if soonest is not None:
            return LeaseOutcome("wait", retry_after_seconds=max(soonest - now, 0.0))
        if state.all_acked and run.current_epoch + 1 < run.epochs:
            return LeaseOutcome("next_epoch", next_epoch=run.current_epoch + 1)
        return LeaseOutcome("done")

    def ack(self, run_id: str, lease_id: str, consumer: str | None = None, force: bool = False) -> Ack:
        """Ack a lease's shard. `consumer`: who asks (403 if the lease is another's, unless `force`)."""
        def op(batch: Batch):
            state = self._epoch_leases(batch, self._run(batch, run_id))
            if lease_id not in state.leases:
                return self._ack_elsewhere(batch.sql(), run_id, lease_id, consumer, force)
            state.check_consumer(lease_id, consumer, force)
            shard = state.leases[lease_id]
            ack = Ack(lease_id, run_id, state.epoch, shard,
                      already_acked=state.check_ack(lease_id) == "already")
            if not ack.already_acked:
                batch.add("service.insert_acks", {
                    "run_id": run_id, "epoch": state.epoch, "shard": shard, "lease_id": lease_id,
                    "acked_at": self._clock()})
                state.record_ack(shard, lease_id)
            return ack

        return self._write(op)

    def renew(self, run_id: str, lease_id: str, ttl_seconds: float, consumer: str | None = None,
              force: bool = False) -> Renewal:
        """Extend a lease to now + `ttl_seconds`: live, or expired with its shard not leased again."""
        def op(batch: Batch):
            state = self._epoch_leases(batch, self._run(batch, run_id))
            if lease_id not in state.leases:
                self._ack_elsewhere(batch.sql(), run_id, lease_id, consumer, force)  # 404, 403, 409
                raise ConflictError(f"lease {lease_id} has acked its shard; there is nothing to renew",
                                    code="lease_acked", detail={"field": "lease_id", "value": lease_id})
            state.check_consumer(lease_id, consumer, force)
            state.check_renew(lease_id)
            expires_at = self._clock() + ttl_seconds
            batch.sql().execute(statement("service.renew_lease"),
                                {"lease_id": lease_id, "expires_at": expires_at})
            state.renew(lease_id, expires_at)
            return Renewal(lease_id, run_id, state.epoch, state.leases[lease_id], expires_at)

        return self._write(op)

    @staticmethod
    def _ack_elsewhere(cur, run_id: str, lease_id: str, consumer: str | None = None,
                       force: bool = False) -> Ack:
        """A lease not of the current epoch: of an earlier, fully acked one, or unknown."""
        row = cur.execute(statement("service.get_lease"), {"lease_id": lease_id}).fetchone()
        if row is None or row[0] != run_id:
            raise NotFoundError(f"run {run_id!r} has no lease {lease_id!r}",
                                detail={"field": "lease_id", "value": lease_id})
        _, epoch, shard, holder_consumer = row
        check_consumer(lease_id, holder_consumer, consumer, force)
        holder = cur.execute(statement("service.get_ack"),
                             {"run_id": run_id, "epoch": epoch, "shard": shard}).fetchone()
        if holder is None or holder[0] != lease_id:
            raise ConflictError(f"lease {lease_id} expired and shard {shard} of epoch {epoch} was acked "
                                f"under lease {holder[0] if holder else None}; discard the work done on it",
                                code="lease_superseded",
                                detail={"field": "lease_id", "value": lease_id, "epoch": epoch,
                                        "shard": shard})
        return Ack(lease_id, run_id, epoch, shard, already_acked=True)

    # ---- reads (any thread) -----------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord:
        with self._reader() as cur:
            return self._fetch_run(cur, run_id)

    def progress(self, run_id: str) -> list[dict]:
        """Per epoch: items, shards, acked, leased (live), pending (free or expired)."""
        with self._reader() as cur:
            rel = cur.execute(statement("service.progress"), {"run_id": run_id, "now": self._clock()})
            names = [d[0] for d in rel.description]
            rows = [dict(zip(names, row, strict=True)) for row in rel.fetchall()]
        for row in rows:
            row["pending"] = row["shards"] - row["acked"] - row["leased"]
        return rows

    def history(self, run_id: str) -> list[dict]:
        """Every plan segment of every epoch: epoch, segment, from_shard, snapshot_id, student_ids,
        checkpoint_id, created_at (epochs recorded before segments existed: segment 0 only)."""
        with self._reader() as cur:
            rel = cur.execute(statement("service.run_segments"), {"run_id": run_id})
            names = [d[0] for d in rel.description]
            rows = [dict(zip(names, row, strict=True)) for row in rel.fetchall()]
        for row in rows:
            row["student_ids"] = json.loads(row["student_ids"]) if row["student_ids"] else None
        return rows

    def segment_starts(self, run_id: str, epoch: int) -> list[int]:
        """The first shard of each plan segment of an epoch ([0] for one recorded before segments)."""
        with self._reader() as cur:
            rows = cur.execute(statement("service.epoch_segments"),
                               {"run_id": run_id, "epoch": epoch}).fetchall()
        return [row[1] for row in rows] or [0]

    def handed_out(self, run_id: str, epoch: int) -> tuple[int, int]:
        """(shards of the epoch ever leased, its plan segments), read together."""
        with self._reader() as cur:
            key = {"run_id": run_id, "epoch": epoch}
            shards, segments = cur.execute(statement("service.handed_out"), key).fetchone()
        return int(shards), int(segments)

    def list_runs(self, limit: int = 50) -> list[dict]:
        """The newest `limit` runs: run_id, created_at, student_id, dataset, epochs, current_epoch."""
        with self._reader() as cur:
            rel = cur.execute(statement("service.list_runs"), {"limit": limit})
            names = [d[0] for d in rel.description]
            return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]

    def expired_shards(self, run_id: str) -> dict[int, int]:
        """epoch -> shards whose latest lease expired unacked (they go out again on the next lease)."""
        with self._reader() as cur:
            rows = cur.execute(statement("service.expired_shards"), {"run_id": run_id, "now": self._clock()})
            return {int(epoch): int(count) for epoch, count in rows.fetchall()}

    def lease_totals(self) -> dict[str, tuple[int, int]]:
        """run_id -> (leases live now, shards whose latest lease expired unacked)."""
        with self._reader() as cur:
            rows = cur.execute(statement("service.lease_totals"), {"now": self._clock()}).fetchall()
        return {run_id: (int(live), int(expired)) for run_id, live, expired in rows}

    def outstanding_leases(self) -> int:
        with self._reader() as cur:
            return int(cur.execute(statement("service.outstanding_leases"),
                                   {"now": self._clock()}).fetchone()[0])
