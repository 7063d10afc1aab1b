"""Train on a run of the paced service: lease shards lazily, keep them renewed, ack after steps.

    client = ShardClient("http://HOST:8000/v1/runs/RUN_ID")
    for rows in client.batches(8):          # lists of rows (prompt, completion, weight, ...)
        ...loss, backward, optimizer step...
        client.step_done()                  # acks the shards whose last row that step used

A shard is leased only when a row of it is asked for (opening or inspecting a dataset leases
nothing) and is kept: an iteration abandoned half-way (a trainer peeking at the first row) is
not a dropped lease, the next iteration starts again at the first row of each shard held and
not finished. A background thread renews every held lease at a third of its TTL. The
service's `wait` answer is waited out, except when the shards blocking the run may be our own
unacked ones (an epoch's end): `batches` then hands out the partial batch it has, and `rows`
(and the datasets built on it) end the pass — trainers take the next pass as a new epoch.
`done` ends.

When is a shard acked? `step_done()` acks every shard that is *ready*:
- by default, a shard is ready once its last row has been handed out (`rows`, `batches`): in a
  loop that steps on exactly the rows it was handed, that is the step that used the last row;
- after `track_batches()`, a shard is ready once `consumed(marks)` reports the `paced_done`
  mark of its last row from a batch that was trained on (`paced.integrations.trl` does this:
  right even when the data loader reads ahead).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from paced.client.service import LeaseAnswer, ServiceClient, run_base
from paced.errors import InputError

log = logging.getLogger(__name__)
DONE_COLUMN = "paced_done"  # on a shard's last row handed out: its lease id ("" on the others)
_BLOCKED = object()  # the service asks to wait and our own unacked shards may be what it waits for


def default_consumer() -> str:
    return f"{socket.gethostname()[:80]}-{os.getpid()}"


@dataclass
class HeldShard:
    """A leased shard and how far it has been handed out."""

    lease_id: str
    epoch: int
    index: int
    rows: list[dict]
    snapshot_id: str | None
    ttl_seconds: float
    finished: bool = False  # every row handed out
    consumed: bool = False  # a trained batch held its last row (track_batches)


class ShardClient:
    """Leases of one run. See the module docstring."""

    def __init__(self, run_url: str, *, token: str | None = None, consumer: str | None = None,
                 ttl_seconds: float | None = None, require_completion: bool = True, retries: int = 5,
                 timeout_seconds: float = 30.0, backoff_seconds: float = 0.5,
                 renew_in_background: bool = True):
        base, self.run_id = run_base(run_url)
        self.run_url = f"{base}/v1/runs/{self.run_id}"
        self.service = ServiceClient(base, token=token, retries=retries, timeout_seconds=timeout_seconds,
                                     backoff_seconds=backoff_seconds)
        self.consumer = consumer or default_consumer()
        self.ttl_seconds, self.require_completion = ttl_seconds, require_completion
        self.renew_in_background = renew_in_background
        self.held: dict[str, HeldShard] = {}  # leased and not acked, in lease order
        self.leased = self.acked = self.skipped_rows = 0
        # acks refused; leases lost at renewal (their shards went out again)
        self.conflicts = self.dropped = 0
        self.done = False  # the service said every shard of every epoch is acked
        self._by_batches = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ------------------------------------------------------------ iteration

    def rows(self) -> Iterator[dict]:
        """Rows (dicts with a `paced_done` mark), shard after shard, until the run is done or the
        service asks to wait on shards we may hold ourselves (the pass ends)."""
        for row in self._stream():
            if row is _BLOCKED:
                return
            yield row

    def batches(self, batch_size: int) -> Iterator[list[dict]]:
        """Lists of up to `batch_size` rows (shorter where the service asks to wait on our own
        shards, and at the end). Step on each, then call `step_done()`."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[dict] = []
        for row in self._stream():
            if row is not _BLOCKED:
                batch.append(row)
            if batch and (row is _BLOCKED or len(batch) == batch_size):
                yield batch
                batch = []
        if batch:
            yield batch

    def _stream(self) -> Iterator:
        with self._lock:
            replay = [s for s in self.held.values() if not s.finished]
        for shard in replay:
            yield from self._shard_rows(shard)
        blocked = False
        while not self.done:
            shard = self._next_shard(wait_on_own=blocked)
            blocked = shard is None
            if shard is None:
                yield _BLOCKED
            else:
                yield from self._shard_rows(shard)

    def _shard_rows(self, shard: HeldShard) -> Iterator[dict]:
        usable = [r for r in shard.rows if not self.require_completion or r.get("completion")]
        if not usable:  # nothing to train on: ready to ack at the next step
            shard.finished = shard.consumed = True
        for j, row in enumerate(usable):
            last = j == len(usable) - 1
            shard.finished = shard.finished or last
            yield {**row, DONE_COLUMN: shard.lease_id if last else ""}

    def _next_shard(self, wait_on_own: bool = False) -> HeldShard | None:
        """The next leased shard; None when done, or when the service asks to wait while we hold
        shards finished but not acked (they may be what it waits for) and `wait_on_own` is
        false (the caller has not had a chance to step and ack them yet)."""
        while True:
            got = self.lease()
            if got is None or isinstance(got, HeldShard):
                return got
            with self._lock:
                pending = any(s.finished for s in self.held.values())
            if pending and not wait_on_own:
                return None
            self._stop.wait(got)

    def lease(self) -> HeldShard | float | None:
        """One lease request: the shard (now held and renewed), the seconds the service asks us
        to wait, or None when every shard of every epoch is acked."""
        answer: LeaseAnswer = self.service.lease(self.run_url, self.consumer, self.ttl_seconds)
        if answer.status == "done":
            self.done = True
            return None
        if answer.status == "wait":
            return answer.retry_after_seconds
        rows = [dict(r) for r in answer.items]
        self.skipped_rows += sum(1 for r in rows if self.require_completion and not r.get("completion"))
        shard = HeldShard(answer.lease_id, answer.epoch, answer.shard, rows, answer.snapshot_id,
                          float(answer.ttl_seconds or self.ttl_seconds or 300.0))
        with self._lock:
            self.held[shard.lease_id] = shard
            self.leased += 1
        if self.renew_in_background:
            self._start_renewer()
        return shard

    # ------------------------------------------------------------ acks

    def track_batches(self) -> None:
        """Ack only shards whose last row `consumed()` reports from a trained batch."""
        self._by_batches = True

    def consumed(self, marks: Iterable[str]) -> None:
        """`paced_done` marks of the rows of a batch that was (or is being) trained on."""
        with self._lock:
            for mark in marks:
                if mark and mark in self.held:
                    self.held[mark].consumed = True

    def step_done(self) -> int:
        """Call after each optimizer step: acks the shards that step finished; how many."""
        with self._lock:
            ready = [s.lease_id for s in self.held.values()
                     if (s.consumed if self._by_batches else s.finished)]
        for lease_id in ready:
            self.ack(lease_id)
        return len(ready)

    def ack(self, lease_id: str) -> bool:
        """Ack one held lease now; False (counted in `conflicts`, with a warning) when the
        service refuses it: the lease expired and its shard went out again."""
        with self._lock:
            shard = self.held.pop(lease_id, None)
        if self.service.ack(self.run_url, lease_id):
            self.acked += 1
            return True
        self.conflicts += 1
        where = f"shard {shard.index} of epoch {shard.epoch}" if shard else "its shard"
        log.warning("ack of lease %s refused: it expired and %s went out again (raise the lease TTL)",
                    lease_id, where)
        return False

    # ------------------------------------------------------------ renewals

    def renew(self, ttl_seconds: float | None = None) -> int:
        """Extend every held lease now (default TTL: the client's, else the service's); how many
        were renewed. A lease the service no longer lets us hold is dropped with a warning."""
        with self._lock:
            shards = list(self.held.values())
        renewed = 0
        for shard in shards:
            ttl = self.service.renew(self.run_url, shard.lease_id, ttl_seconds or self.ttl_seconds)
            if ttl is None:
                with self._lock:
                    if self.held.pop(shard.lease_id, None) is not None:
                        self.dropped += 1
                log.warning("lease %s could not be renewed: its shard went out again", shard.lease_id)
                continue
            shard.ttl_seconds = ttl
            renewed += 1
        return renewed

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew_loop, name="paced-renew", daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        while True:
            with self._lock:
                ttls = [s.ttl_seconds for s in self.held.values()]
            if self._stop.wait(max(0.05, min(ttls, default=60.0) / 3)):
                return
            try:
                self.renew()
            except Exception as err:  # keep renewing: the trainer's own calls report lasting faults
                log.warning("renewing leases failed: %s", err)

    def close(self) -> None:
        """Stop renewing and close the connection (held leases then expire and go out again)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        self.service.close()

    def __enter__(self) -> ShardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ datasets

    def dataset(self):
        """A `datasets.IterableDataset` over `rows()` (leases nothing until iterated)."""
        import datasets

        features = datasets.Features({
            "position": datasets.Value("int64"), "problem_id": datasets.Value("string"),
            "prompt": datasets.Value("string"), "completion": datasets.Value("string"),
            "weight": datasets.Value("float64"), "pass_rate": datasets.Value("float64"),
            "n": datasets.Value("int64"), "dataset": datasets.Value("string"),
            "guard": datasets.Value("string"), DONE_COLUMN: datasets.Value("string")})
        return datasets.IterableDataset.from_generator(_RowsOf(self), features=features)

    def torch_dataset(self):
        """A `torch.utils.data.IterableDataset` over `rows()` (torch is imported here)."""
        from paced.client.torch_dataset import ShardIterableDataset

        return ShardIterableDataset(self)


class _RowsOf:
    """`client.rows` as the generator of a `datasets.IterableDataset`: `datasets` fingerprints it
    by pickling, which a client (a connection, a thread) does not survive; it pickles as its
    run and consumer, and refuses to be rebuilt in another process."""

    def __init__(self, client: ShardClient):
        self.client = client

    def __call__(self) -> Iterator[dict]:
        return self.client.rows()

    def __reduce__(self):
        return _other_process, (self.client.run_url, self.client.consumer)


def _other_process(run_url: str, consumer: str):
    raise InputError(f"the rows of {run_url} (consumer {consumer}) belong to the process that leased them: "
                     "read the dataset in that process (num_workers=0)")
