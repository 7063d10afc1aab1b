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
from typing import TYPE_CHECKING

import numpy as np

from paced.errors import InputError, PacedError

if TYPE_CHECKING:
    from paced.trainer.config import TrainConfig
from paced.store.files import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a file stream resumes: the next unread row of shard `shard` of epoch `epoch`."""

    epoch: int = 0
    shard: int = 0
    row: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "row": self.row}

    @classmethod
    def from_json(cls, data: dict | None) -> Position | None:
        if data is None:
            return None
        try:
            return cls(int(data["epoch"]), int(data["shard"]), int(data["row"]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"a saved data position must hold epoch, shard and row, got {data!r}") from err


@dataclass(frozen=True)
class Rows:
    """Rows as columns: `weights` (float64, read once) and every other column of the shard
    (`prompt`, `completion`, `problem_id`, `dataset`, `answer`, `n`, `pass_rate`, ...)."""

    columns: dict[str, list]
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def prompts(self) -> list[str]:
        return self.columns["prompt"]

    @property
    def completions(self) -> list[str | None]:
        return self.column("completion")

    def column(self, name: str) -> list:
        """The column's values; None for every row when the shard has no such column."""
        values = self.columns.get(name)
        return values if values is not None else [None] * len(self)


@dataclass(frozen=True)
class ShardRows(Rows):
    """One shard's rows as columns. `key` names it for `ack`; `start` is the first row to use (resume)."""

    key: str = ""
    epoch: int = -1
    index: int = -1
    start: int = 0
    wait_seconds: float | None = None  # not a shard: the service asks to come back later

    @classmethod
    def from_columns(cls, key: str, columns: dict[str, list], epoch: int, index: int, start: int = 0,
                     where: str = "") -> ShardRows:
        """A shard from its columns; InputError naming the shard (`where`) when a row lacks a
        weight or a prompt, or a weight is not a finite number >= 0."""
        where = where or key
        for name in ("prompt", "weight"):
            values = columns.get(name)
            if values is None or any(v is None for v in values):
                row = "the column" if values is None else f"row {[v is None for v in values].index(True)}"
                raise InputError(f"shard {where}: {row} has no `{name}` "
                                 "(rebuild it with `paced manifest build`)")
        try:
            weights = np.asarray(columns["weight"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InputError(f"shard {where}: `weight` must hold numbers ({err})") from err
        bad = ~np.isfinite(weights) | (weights < 0)
        if bad.any():
            raise InputError(f"shard {where}: row {int(np.argmax(bad))} has weight {weights[bad][0]!r}; "
                             "weights must be finite and >= 0 (rebuild it with `paced manifest build`)")
        return cls({k: list(v) for k, v in columns.items() if k != "weight"}, weights, key=key, epoch=epoch,
                   index=index, start=start)

    @classmethod
    def wait(cls, seconds: float) -> ShardRows:
        return cls({"prompt": []}, np.zeros(0), wait_seconds=seconds)


@dataclass(frozen=True)
class Batch(Rows):
    """One process's micro-batch (columns) and the bookkeeping of the stream up to its end."""

    done_keys: tuple[str, ...] = ()  # shards whose every row is now consumed (ack after the step)
    position: Position | None = None  # where the stream resumes after this batch (files)
    wait_seconds: float | None = None  # no rows: the service has none free now, ask again later

    def select(self, keep: np.ndarray) -> Rows:
        """The rows where `keep` is true (columns only)."""
        idx = np.flatnonzero(keep)
        return Rows({name: [values[i] for i in idx] for name, values in self.columns.items()},
                    self.weights[idx])


# ---------------------------------------------------------------- shard files


class FileShardSource:
    """Shards of a manifest folder, epoch after epoch, from `position` (epoch, shard, row)."""

    shared = True

    def __init__(self, folder: str | Path, position: Position | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"--from {self.folder}: no such folder (expected a manifest folder "
                             "from `paced manifest build --out DIR`, or an http:// run URL)")
        self.files = sorted(self.folder.glob("shard-*.parquet"))
        if not self.files:
            raise InputError(f"--from {self.folder}: no shard-*.parquet files in this folder")
        info = self.folder / "manifest.json"
        self.manifest = read_json(info) if info.exists() else {}
        if self.manifest.get("form", "text") != "text":
            raise InputError(f"--from {self.folder}: its shards are in the {self.manifest['form']} form "
                             "(for external "
                             "trainers); paced train reads the text form: build the manifest without --form")
        self.position = position or Position()

    def __iter__(self) -> Iterator[ShardRows]:
        import pyarrow.parquet as pq

        epoch, index, row = self.position.epoch, self.position.shard, self.position.row
        while True:
            if index >= len(self.files):
                epoch, index, row = epoch + 1, 0, 0
            path = self.files[index]
            try:
                table = pq.read_table(path)
            except OSError as err:
                raise InputError(f"cannot read shard file {path}: {err}") from err
            columns = table.to_pydict()
            yield ShardRows.from_columns(f"{epoch}/{path.name}", columns, epoch, index, row, where=str(path))
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
            raise InputError(f"--from {run_url}: a service URL must name a run: "
                             "http://HOST:PORT/v1/runs/RUN_ID")
        self.client = ShardClient(run_url, token=token, consumer=consumer, ttl_seconds=ttl_seconds,
                                  require_completion=False, retries=retries, timeout_seconds=timeout_seconds)
        self.run_url = self.client.run_url

    def __iter__(self) -> Iterator[ShardRows]:
        while True:
            shard = self.client.lease()
            if shard is None:
                return
            if isinstance(shard, float):
                yield ShardRows.wait(shard)
                continue
            shard.finished = True
            names = dict.fromkeys(name for row in shard.rows for name in row)
            columns = {name: [row.get(name) for row in shard.rows] for name in names}
            yield ShardRows.from_columns(shard.lease_id, columns, shard.epoch, shard.index,
                                         where=f"lease {shard.lease_id} of {self.run_url}")

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


def open_source(config: TrainConfig, rank: int, position: Position | None,
                source: str | None = None) -> FileShardSource | HttpShardSource:
    """The shard source `source` (default `--from`) names, at `position` (files) when given."""
    source = source or config.source
    if source.startswith(("http://", "https://")):
        token = config.token or os.environ.get("PACED_TOKEN") or None
        return HttpShardSource(source, token=token, consumer=config.consumer or default_consumer(rank),
                               ttl_seconds=config.lease_ttl_seconds, retries=config.http_retries,
                               timeout_seconds=config.http_timeout_seconds)
    return FileShardSource(source, position)


def open_stream(config: TrainConfig, rank: int, world_size: int, source: str,
                position: Position | None = None) -> BatchStream:
    """A batch stream over `source` (files: from `position`)."""
    stream = BatchStream(open_source(config, rank, None, source), config.batch_size, need_completion=True,
                         rank=rank, world_size=world_size)
    stream.load_state_dict({"position": position.to_json() if position else None})
    return stream


# ---------------------------------------------------------------- batches


Row = tuple[ShardRows, int]  # a row: its shard and its index there


def gather(rows: list[Row], done_keys: tuple[str, ...], position: Position | None) -> Batch:
    """The batch of `rows` (from one or more shards) as columns: a column some shard lacks is None
    in that shard's rows."""
    names = dict.fromkeys(name for shard, _ in rows for name in shard.columns)
    columns = {name: [shard.columns[name][j] if name in shard.columns else None for shard, j in rows]
               for name in names}
    weights = np.array([shard.weights[j] for shard, j in rows], dtype=np.float64)
    return Batch(columns or {"prompt": []}, weights, done_keys=done_keys, position=position)


@dataclass
class BatchStream:
    """Cuts batches from a source's rows. See the module docstring for ranks and skipping.

    `state_dict()` is where the stream stands after the batches taken so far (a batch given
    back with `push_back` is not taken); `load_state_dict()` before the first batch puts a file
    stream there (a service stream has no position: the service knows what was acked)."""

    source: object
    batch_size: int
    need_completion: bool
    rank: int = 0
    world_size: int = 1
    skipped_rows: int = 0  # rows left out for lack of a completion
    position: Position | None = None  # after the last batch taken (files)
    _rows: Iterator | None = field(default=None, repr=False)
    _pushed: Batch | None = field(default=None, repr=False)
    _before_pushed: Position | None = field(default=None, repr=False)

    def state_dict(self) -> dict:
        return {"position": self.position.to_json() if self.position else None}

    def load_state_dict(self, state: dict) -> None:
        if self._rows is not None:
            raise PacedError("load_state_dict: the stream has started; open a new one", code="stream_started")
        self.position = Position.from_json(state.get("position"))
        if isinstance(self.source, FileShardSource) and self.position is not None:
            self.source.position = self.position

    def _row_stream(self) -> Iterator[tuple[Row | None, str | None, Position | None, float | None]]:
        """(row or None if left out, key of a shard finished at this row, position after it,
        seconds to wait when the source has nothing now)."""
        useful, counting, epoch = 0, None, None
        for shard in self.source:
            if shard.wait_seconds is not None:
                yield None, None, None, shard.wait_seconds
                continue
            if shard.epoch != epoch:  # a full epoch of files without a trainable row: loop forever
                if counting and useful == 0 and self.source.shared:
                    raise InputError(f"no row of {getattr(self.source, 'folder', 'the source')} "
                                     " has a weight > 0"
                                     + (" and a completion" if self.need_completion else "")
                                     + ": nothing to train on")
                counting, useful, epoch = shard.index == 0 and shard.start == 0, 0, shard.epoch
            next_shard = Position(shard.epoch, shard.index + 1, 0)
            completions = shard.completions
            if shard.start >= len(shard):
                yield None, shard.key, next_shard, None
            for j in range(shard.start, len(shard)):
                last = j == len(shard) - 1
                after = next_shard if last else Position(shard.epoch, shard.index, j + 1)
                row: Row | None = (shard, j)
                if self.need_completion and not completions[j]:
                    self.skipped_rows += 1
                    row = None
                elif shard.weights[j] > 0:
                    useful += 1
                yield row, (shard.key if last else None), after, None

    def _cut(self) -> Batch | None:
        rows: list[Row] = []
        keys, position = [], None
        if self._rows is None:
            self._rows = self._row_stream()
        for row, key, after, wait in self._rows:
            if wait is not None:
                if rows or keys:  # train on what we hold first, so its shards get acked
                    break
                return Batch({"prompt": []}, np.zeros(0), position=position, wait_seconds=wait)
            position = after
            if key is not None:
                keys.append(key)
            if row is not None:
                rows.append(row)
                if len(rows) == self.batch_size:
                    break
        if not rows and not keys:
            return None
        return gather(rows, tuple(keys), position)

    def push_back(self, batch: Batch) -> None:
        """Return a batch to the stream: the next `next_batch` gives it again."""
        self._pushed, self.position = batch, self._before_pushed

    def next_batch(self) -> Batch | None:
        """This process's next batch (None when the source is exhausted)."""
        batch = self._next()
        if batch is not None and batch.wait_seconds is None:
            self._before_pushed = self.position
            self.position = batch.position or self.position
        return batch

    def _next(self) -> Batch | None:
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
        last = next(b for b in reversed(group) if b is not None)
        return Batch(mine.columns, mine.weights, done_keys=keys, position=last.position)
