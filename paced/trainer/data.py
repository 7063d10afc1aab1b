"""Where the trainer's rows come from and how they become batches (tokens: `tokens.py`).

Sources yield `ShardRows` (a key and its rows) and take an `ack(key)` once the steps that used
a shard are done:

- `FileShardSource`: a manifest folder (`manifest.json`, `shard-00000.parquet`, ...), read
  shard after shard and epoch after epoch (the same files again: `paced manifest build` already
  fixed the order). Every process reads the whole stream (`shared`); acks are no-ops.
- `HttpShardSource`: a run of the service. Each process leases its own shards
  (`POST {run}/leases`) and acks a shard (`POST {run}/leases/{lease}/ack`) after the optimizer
  step that consumed its last row. A shard that was leased but not acked (a killed or finished
  trainer) is handed out again by the service once its lease expires; `renew()` extends the
  leases it holds (before a pass-rate refresh, which may outlast them).

`BatchStream` cuts `batch_size`-row batches from the row stream (rows without a completion are
left out and counted when training off-policy). With a shared source and several processes,
the stream is cut into groups of `world_size` batches and rank r keeps the r-th of each.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from paced.errors import InputError
from paced.store.files import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRows:
    """One shard's rows. `key` names it for `ack`; `start` is the first row to use (resume)."""

    key: str
    rows: list[dict]
    epoch: int
    index: int
    start: int = 0
    wait_seconds: float | None = None  # not a shard: the service asks to come back later


@dataclass(frozen=True)
class Batch:
    """One process's micro-batch and the bookkeeping of the stream up to its end."""

    rows: list[dict]
    done_keys: tuple[str, ...]  # shards whose every row is now consumed (ack after the step)
    position: dict | None  # where the stream resumes after this batch (files: epoch/shard/row)
    wait_seconds: float | None = None  # no rows: the service has none free now, ask again later


# ---------------------------------------------------------------- shard files


class FileShardSource:
    """Shards of a manifest folder, epoch after epoch, from `position` (epoch, shard, row)."""

    shared = True

    def __init__(self, folder: str | Path, position: dict | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"--from {self.folder}: no such folder (expected a manifest folder "
                             "from `paced manifest build --out DIR`, or an http:// run URL)")
        self.files = sorted(self.folder.glob("shard-*.parquet"))
        if not self.files:
            raise InputError(f"--from {self.folder}: no shard-*.parquet files in this folder")
        self.manifest = read_json(self.folder / "manifest.json") if (self.folder / "manifest.json").exists() else {}
        if self.manifest.get("form", "text") != "text":
            raise InputError(f"--from {self.folder}: its shards are in the {self.manifest['form']} form (for external "
                             "trainers); paced train reads the text form: build the manifest without --form")
        self.position = dict(position or {"epoch": 0, "shard": 0, "row": 0})

    def __iter__(self) -> Iterator[ShardRows]:
        import pyarrow.parquet as pq

        epoch, index, row = self.position["epoch"], self.position["shard"], self.position["row"]
        while True:
            if index >= len(self.files):
                epoch, index, row = epoch + 1, 0, 0
            path = self.files[index]
            try:
                rows = pq.read_table(path).to_pylist()
            except OSError as err:
                raise InputError(f"cannot read shard file {path}: {err}") from err
            yield ShardRows(f"{epoch}/{path.name}", rows, epoch, index, row)
            index, row = index + 1, 0

    def ack(self, key: str) -> None:
        """Files need no acknowledgement: the checkpoint's position says what is consumed."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the service


def default_consumer(rank: int) -> str:
    return f"{socket.gethostname()[:80]}-{os.getpid()}-rank{rank}"


class HttpShardSource:
    """Leases of one run of the service, through `paced.client.ShardClient` (one implementation
    for paced train and external trainers): lease, yield the rows, ack when told; held leases
    are renewed in the background. Connection errors, 429 and 5xx answers are retried with
    exponential backoff; 4xx answers raise a `PacedError` carrying the service's message. A
    lease answer of `wait` is passed on as a `ShardRows` with `wait_seconds` (the trainer first
    finishes and acks what it holds: its own leases may be what blocks the rest); `done` ends."""

    shared = False

    def __init__(self, run_url: str, *, token: str | None = None, consumer: str = "trainer",
                 ttl_seconds: float | None = None, retries: int = 5, timeout_seconds: float = 30.0):
        from paced.client import ShardClient

        if not run_url.startswith(("http://", "https://")) or "/v1/runs/" not in run_url:
            raise InputError(f"--from {run_url}: a service URL must name a run: http://HOST:PORT/v1/runs/RUN_ID")
        self.client = ShardClient(run_url, token=token, consumer=consumer, ttl_seconds=ttl_seconds,
                                  require_completion=False, retries=retries, timeout_seconds=timeout_seconds)
        self.run_url = self.client.run_url

    def __iter__(self) -> Iterator[ShardRows]:
        while True:
            shard = self.client.lease()
            if shard is None:
                return
            if isinstance(shard, float):
                yield ShardRows("", [], -1, -1, wait_seconds=shard)
                continue
            shard.finished = True
            yield ShardRows(shard.lease_id, shard.rows, shard.epoch, shard.index)

    @property
    def held(self) -> dict:
        return self.client.held

    @property
    def leased(self) -> int:
        return self.client.leased

    @property
    def acked(self) -> int:
        return self.client.acked

    @property
    def conflicts(self) -> int:
        return self.client.conflicts

    def renew(self, ttl_seconds: float | None = None) -> int:
        """Extend every lease held (not acked yet) to `ttl_seconds` (default: the source's TTL,
        else the service's) from now, e.g. before a re-measurement that may outlast them; how
        many were renewed. A lease the service no longer lets us keep is dropped with a warning."""
        return self.client.renew(ttl_seconds)

    def ack(self, key: str) -> None:
        self.client.ack(key)

    def close(self) -> None:
        self.client.close()


def open_source(config, rank: int, position: dict | None, source: str | None = None):
    """The shard source `source` (default `--from`) names, at `position` (files) when given."""
    source = source or config.source
    if source.startswith(("http://", "https://")):
        token = config.token or os.environ.get("PACED_TOKEN") or None
        return HttpShardSource(source, token=token, consumer=config.consumer or default_consumer(rank),
                               ttl_seconds=config.lease_ttl_seconds, retries=config.http_retries,
                               timeout_seconds=config.http_timeout_seconds)
    return FileShardSource(source, position)


def open_stream(config, rank: int, world_size: int, source: str, position: dict | None) -> BatchStream:
    """A batch stream over `source` (files: from `position`)."""
    return BatchStream(open_source(config, rank, position, source), config.batch_size, need_completion=True,
                       rank=rank, world_size=world_size)


# ---------------------------------------------------------------- batches


@dataclass
class BatchStream:
    """Cuts batches from a source's rows. See the module docstring for ranks and skipping."""

    source: object
    batch_size: int
    need_completion: bool
    rank: int = 0
    world_size: int = 1
    skipped_rows: int = 0  # rows left out for lack of a completion
    _rows: Iterator | None = field(default=None, repr=False)
    _pushed: Batch | None = field(default=None, repr=False)

    def _row_stream(self) -> Iterator[tuple[dict | None, str | None, dict | None, float | None]]:
        """(row or None if left out, key of a shard finished at this row, position after it,
        seconds to wait when the source has nothing now)."""
        useful, counting, epoch = 0, None, None
        for shard in self.source:
            if shard.wait_seconds is not None:
                yield None, None, None, shard.wait_seconds
                continue
            if shard.epoch != epoch:  # a full epoch of files without a trainable row: loop forever
                if counting and useful == 0 and self.source.shared:
                    raise InputError(f"no row of {getattr(self.source, 'folder', 'the source')} has a weight > 0"
                                     + (" and a completion" if self.need_completion else "")
                                     + ": nothing to train on")
                counting, useful, epoch = shard.index == 0 and shard.start == 0, 0, shard.epoch
            if shard.start >= len(shard.rows):
                yield None, shard.key, {"epoch": shard.epoch, "shard": shard.index + 1, "row": 0}, None
            for j in range(shard.start, len(shard.rows)):
                row = shard.rows[j]
                last = j == len(shard.rows) - 1
                pos = {"epoch": shard.epoch, "shard": shard.index + 1, "row": 0} if last else \
                    {"epoch": shard.epoch, "shard": shard.index, "row": j + 1}
                if self.need_completion and not row.get("completion"):
                    self.skipped_rows += 1
                    row = None
                elif float(row.get("weight") or 0.0) > 0:
                    useful += 1
                yield row, (shard.key if last else None), pos, None

    def _cut(self) -> Batch | None:
        rows, keys, position = [], [], None
        if self._rows is None:
            self._rows = self._row_stream()
        for row, key, after, wait in self._rows:
            if wait is not None:
                if rows or keys:  # train on what we hold first, so its shards get acked
                    break
                return Batch([], (), position, wait_seconds=wait)
            position = after
            if key is not None:
                keys.append(key)
            if row is not None:
                rows.append(row)
                if len(rows) == self.batch_size:
                    break
        if not rows and not keys:
            return None
        return Batch(rows, tuple(keys), position)

    def push_back(self, batch: Batch) -> None:
        """Return a batch to the stream: the next `next_batch` gives it again."""
        self._pushed = batch

    def next_batch(self) -> Batch | None:
        """This process's next batch (None when the source is exhausted)."""
        if self._pushed is not None:
            batch, self._pushed = self._pushed, None
            return batch
        if not self.source.shared or self.world_size == 1:
            return self._cut()
        group = [self._cut() for _ in range(self.world_size)]
        mine = group[self.rank]
        if mine is None:
            return None
        keys = tuple(k for b in group if b is not None for k in b.done_keys)
        return Batch(mine.rows, keys, next(b for b in reversed(group) if b is not None).position)
