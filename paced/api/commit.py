"""Group commit: write operations run on one thread that owns the database's writer cursor.

Callers queue an operation and wait. The writer takes every queued operation, runs them in
order inside one transaction and commits once (one fsync for the batch); only then does each
caller get its answer. So the writes are serialised (each operation sees the ones before it),
every answer is durable before it is given, and concurrent requests share the cost of a commit.
Operations may also queue rows (`Batch.add`): rows for one statement are written with a single
statement per batch (its parameters are lists, one per column), which is most of the saving;
`Batch.sql()` writes the queued rows first, so any SQL an operation runs sees every earlier write.

An operation raises a `PacedError` (not found, conflict) only before it writes anything; that
error is its answer and the batch goes on. Any other error aborts the transaction: nothing of
the batch is kept, `on_abort` drops whatever the operations had mirrored in memory, and every
caller in the batch gets an error (the one that failed gets its own exception).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from paced.errors import PacedError
from paced.store.sql import statement

log = logging.getLogger("paced.api")
MAX_BATCH = 256


class Unavailable(PacedError):
    code = "unavailable"
    status = 503


class Batch:
    """What an operation gets: queued rows, and the cursor (inside the batch's transaction)."""

    def __init__(self, cursor):
        self._cursor = cursor
        self._rows: dict[str, list[dict]] = {}

    def add(self, statement_name: str, row: dict) -> None:
        """Queue a row for `statement_name`, whose parameters take one list per column."""
        self._rows.setdefault(statement_name, []).append(row)

    def sql(self):
        """The cursor, after writing every queued row."""
        self.flush()
        return self._cursor

    def flush(self) -> None:
        for name, rows in self._rows.items():
            self._cursor.execute(statement(name), {key: [row[key] for row in rows] for key in rows[0]})
        self._rows.clear()


class _Pending:
    __slots__ = ("op", "result", "error", "done")

    def __init__(self, op):
        self.op, self.result, self.error, self.done = op, None, None, threading.Event()


class GroupCommitter:
    """Runs `op(batch)` callables in batches on its own thread. `stop()` drains, then ends it."""

    def __init__(self, cursor, on_abort: Callable[[], None], name: str = "paced-state-writer"):
        self._cursor, self._on_abort = cursor, on_abort
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[Batch], Any]) -> Any:
        if self._stopped:
            raise Unavailable("the service is shutting down; retry shortly")
        pending = _Pending(op)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            batch, last = ([] if first is None else [first]), first is None
            while not last and len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                last = item is None
                if not last:
                    batch.append(item)
            if batch:
                self._run(batch)
            if last:
                return

    def _run(self, batch: list[_Pending]) -> None:
        cur = self._cursor
        try:
            cur.begin()
            rows = Batch(cur)
            for pending in batch:
                try:
                    pending.result = pending.op(rows)
                except PacedError as err:
                    pending.error = err
                except Exception as err:
                    pending.error = err
                    raise
            rows.flush()
            cur.commit()
        except Exception:
            log.exception("state write failed; the batch of %d operations is rolled back", len(batch))
            try:
                cur.rollback()
            except Exception:  # noqa: BLE001 - the transaction may already be gone
                pass
            self._on_abort()
            for pending in batch:
                pending.result = None
                if pending.error is None or isinstance(pending.error, PacedError):
                    pending.error = Unavailable("the service could not record the change; retry")
        finally:
            for pending in batch:
                pending.done.set()
