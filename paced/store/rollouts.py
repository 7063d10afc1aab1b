"""Rollout and reference batch files: one immutable Parquet file per committed batch.

    rollouts/{student}/{sampling_hash}/{dataset}/batch-{seq:08d}{tag}.parquet   ROLLOUT_SCHEMA
    rollouts/{student}/{sampling_hash}/{dataset}/sampling.json                  the full sampling config
    references/{dataset}/{teacher}/batch-{seq:08d}{tag}.parquet                 REFERENCE_SCHEMA
    references/{dataset}/{teacher}/done-{seq:08d}{tag}.json                     every id the batch tried

`seq` is the commit sequence number within the folder (0, 1, 2, ...) and `tag` the writer's
shard (`-s{rank}of{world}`, empty for a job over the whole pool, see `paced.store.partition`):
one greater than the greatest batch with the same tag, so a rerun never overwrites a committed
batch and shards never race for a name. A job over the whole pool holds the folder's lock
(`.lock`) exclusively; a shard holds it shared plus its own `.lock{tag}` exclusively, so the
shards of a folder run at once, never beside a whole-pool job or a second copy of themselves.
Locks are `flock`s, released by the kernel when their holder dies (SIGKILL included).

Readers only glob final names (`batch-*.parquet`); a killed writer leaves at most a `.tmp-*`
file, which the next writer with the same tag (or any whole-pool writer) sweeps under its lock.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from paced.errors import ConflictError
from paced.store.files import (
    FILE_MODE,
    damaged,
    make_dirs,
    read_json,
    read_json_object,
    sweep_temp_files,
    write_json_atomic,
    write_parquet_atomic,
)
from paced.store.home import Home
from paced.store.partition import WHOLE, Shard
from paced.store.sql import connect, query_files, statement

ROLLOUT_SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("dataset", pa.string()),
    ("sample_idx", pa.int32()),  # 0..K-1; sample j's seed is a fixed function of (seed, problem, j)
    ("completion", pa.string()),
    ("outcome", pa.string()),  # correct / wrong / unparseable / timeout / error
    ("tokens", pa.int32()),  # generated tokens in the completion
    ("finish_reason", pa.string()),  # stop / length
    ("student_id", pa.string()),
    ("sampling_hash", pa.string()),
    ("grader", pa.string()),  # name@version of the verifier
])
SAMPLING_FILE = "sampling.json"
LOCK_FILE = ".lock"
_BATCH_RE = re.compile(r"^(?:batch|done)-(\d{8})((?:-s\d+of\d+)?)\.(?:parquet|json)$")
BATCH_HINT = "move it aside and rerun `paced rollout` to roll its problems out again"
SAMPLING_HINT = "delete it: the next `paced rollout` of this config writes it again"


# ---- folders, sequence numbers, locks ---------------------------------------------------------


def batch_files(folder: Path) -> list[Path]:
    """Committed batch files of a folder, in commit order."""
    return sorted(Path(folder).glob("batch-*.parquet"))


def next_seq(folder: Path, shard: Shard = WHOLE) -> int:
    """One more than the greatest sequence number committed with `shard`'s tag (batch or done)."""
    seqs = [int(m.group(1)) for p in Path(folder).glob("*-*")
            if (m := _BATCH_RE.match(p.name)) and m.group(2) == shard.tag]
    return max(seqs, default=-1) + 1


def _flock(folder: Path, name: str, mode: int, what: str) -> int:
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise ConflictError(f"another {what} is writing to {folder}; wait for it to finish",
                            code="busy", detail={"folder": str(folder)}) from err
    return fd


@contextmanager
def folder_lock(folder: Path, what: str, shard: Shard = WHOLE) -> Iterator[None]:
    """Hold the folder's writer lock for `shard` (see the module doc); ConflictError if taken.
    A folder a whole-pool job created is removed again (with the parents it created) when
    nothing was committed in it (no batch, at most its sampling.json), so a job that fails on a
    bad argument or a model that does not load leaves no empty folder behind. (A shard leaves
    its folder: another shard may be starting in it.)"""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    make_dirs(folder)
    fds = [_flock(folder, LOCK_FILE, fcntl.LOCK_EX if shard.whole else fcntl.LOCK_SH, what)]
    try:
        if not shard.whole:
            fds.append(_flock(folder, LOCK_FILE + shard.tag, fcntl.LOCK_EX, f"{what} of shard {shard}"))
            for tmp in list(folder.glob(f".tmp-*{shard.tag}.*")):  # only this shard's leftovers
                tmp.unlink(missing_ok=True)
        else:
            sweep_temp_files(folder)
        yield
    finally:
        try:
            if shard.whole and created and {p.name for p in folder.iterdir()} <= {LOCK_FILE, SAMPLING_FILE}:
                for name in (SAMPLING_FILE, LOCK_FILE):
                    (folder / name).unlink(missing_ok=True)
                for path in created:  # deepest first
                    path.rmdir()
        except OSError:  # another writer came in meanwhile: its folder now
            pass
        for fd in fds:
            os.close(fd)


def num_rows(files: list[Path]) -> int:
    """Total rows of Parquet files, from their footers (no data read); a file whose footer does
    not read is named (`DamagedError`)."""
    total = 0
    for f in files:
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise damaged(Path(f), f"is not a readable Parquet file ({str(err).splitlines()[0][:200]})",
                          BATCH_HINT) from err
    return total


# ---- rollouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutSet:
    """The committed rollouts of one student under one sampling config in one data set."""

    student_id: str
    sampling_hash: str
    dataset: str
    files: tuple[Path, ...]

    @property
    def rows(self) -> int:
        return num_rows(list(self.files))


def write_sampling_config(folder: Path, config: dict) -> None:
    """Record the full sampling config beside the batches (once; the hash names the folder)."""
    path = Path(folder) / SAMPLING_FILE
    if not path.exists():
        write_json_atomic(path, config)


def read_sampling_config(folder: Path) -> dict | None:
    path = Path(folder) / SAMPLING_FILE
    return read_json_object(path, SAMPLING_HINT) if path.exists() else None


def write_rollout_batch(folder: Path, table: pa.Table, shard: Shard = WHOLE) -> Path:
    """Commit one batch of rollouts (sorted by problem, sample) as the shard's next file."""
    table = table.cast(ROLLOUT_SCHEMA).sort_by([("problem_id", "ascending"), ("sample_idx", "ascending")])
    path = Path(folder) / f"batch-{next_seq(folder, shard):08d}{shard.tag}.parquet"
    if path.exists():  # cannot happen under the lock; never overwrite a committed batch
        raise ConflictError(f"{path} already exists")
    return write_parquet_atomic(path, table)


def committed_samples(files: list[Path], con=None) -> dict[str, list[int]]:
    """problem_id -> sorted sample indices committed in `files`."""
    if not files:
        return {}
    table = query_files(con or connect(), statement("rollouts.samples"), {"files": [str(f) for f in files]},
                        files, BATCH_HINT)
    return dict(zip(table["problem_id"].to_pylist(), table["samples"].to_pylist(), strict=True))


def pass_counts(files: list[Path], k: int, con=None) -> pa.Table:
    """Per problem: samples 0..k-1 committed (`n`) and how many are correct."""
    if not files:
        return pa.table({"problem_id": pa.array([], pa.string()), "n": pa.array([], pa.int64()),
                         "correct": pa.array([], pa.int64())})
    return query_files(con or connect(), statement("rollouts.pass_counts"),
                       {"files": [str(f) for f in files], "k": k}, files, BATCH_HINT)


def read_rollouts(files: list[Path], con=None) -> pa.Table:
    """All rows of `files` (ROLLOUT_SCHEMA), sorted by data set, problem, sample."""
    if not files:
        return ROLLOUT_SCHEMA.empty_table()
    table = query_files(con or connect(), statement("rollouts.read_all"), {"files": [str(f) for f in files]},
                        files, BATCH_HINT)
    return table.cast(ROLLOUT_SCHEMA)


def list_rollout_students(home: Home) -> list[str]:
    root = home.root / "rollouts"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def rollout_sets(home: Home, student_id: str) -> list[RolloutSet]:
    """Every (sampling hash, data set) folder of a student that holds committed batches."""
    root = home.root / "rollouts" / student_id
    sets = []
    for folder in sorted(root.glob("*/*")) if root.exists() else []:
        files = batch_files(folder)
        if folder.is_dir() and files:
            sets.append(RolloutSet(student_id, folder.parent.name, folder.name, tuple(files)))
    return sets


# ---- references -------------------------------------------------------------------------------


def done_problems(folder: Path) -> set[str]:
    """Ids a teacher job has finished in this folder: solved (in a batch) or listed as tried."""
    folder = Path(folder)
    done: set[str] = set()
    for marker in sorted(folder.glob("done-*.json")):
        done.update(read_json(marker)["tried"])
    files = batch_files(folder)
    if files:
        for f in files:
            done.update(pq.read_table(f, columns=["problem_id"])["problem_id"].to_pylist())
    return done


def unsolved_problems(folder: Path) -> list[str]:
    """Ids the teacher tried and never solved, sorted."""
    unsolved: set[str] = set()
    for marker in sorted(Path(folder).glob("done-*.json")):
        unsolved.update(read_json(marker)["unsolved"])
    return sorted(unsolved)


def write_reference_batch(folder: Path, table: pa.Table, tried: list[str], unsolved: list[str],
                          schema: pa.Schema, settings: dict | None = None, shard: Shard = WHOLE) -> Path:
    """Commit a teacher batch: the references (if any) first, then the done marker."""
    seq = next_seq(folder, shard)
    if table.num_rows:
        table = table.cast(schema).sort_by([("problem_id", "ascending"), ("attempt", "ascending")])
        write_parquet_atomic(Path(folder) / f"batch-{seq:08d}{shard.tag}.parquet", table)
    return write_json_atomic(Path(folder) / f"done-{seq:08d}{shard.tag}.json",
                             {"tried": sorted(tried), "unsolved": sorted(unsolved), "settings": settings})
