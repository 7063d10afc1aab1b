"""Pass-rate snapshots: `snapshots/{student}/{snapshot_id}.parquet`, immutable once written.

A snapshot id sorts by creation time (`YYYYMMDDTHHMMSSffffffZ-<hash8>`), so the newest snapshot
is the greatest file name. Readers list final names only (never `.tmp-*`), so a refresh that
runs while the service reads can never show half a snapshot: readers see the old snapshot
until the rename puts the new one in place.

Beside each snapshot, `snapshots/{student}/{snapshot_id}.json` (a `SnapshotRecord`, written
before the snapshot): how it was measured (sampling, fingerprint of its inputs) and, for a
lineage refresh, its lineage record and history. `read_snapshot_record` and
`write_snapshot_record` are its only readers and writers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from paced import __version__
from paced.errors import ConflictError, NotFoundError, SchemaError
from paced.store.files import (
    FILE_MODE,
    make_dirs,
    read_json_object,
    read_parquet_checked,
    write_json_atomic,
    write_parquet_atomic,
)
from paced.store.home import Home, validate_name

COUNTS_SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("dataset", pa.string()),
    ("student_id", pa.string()),  # the checkpoint whose rollouts measured this row
    ("sampling_hash", pa.string()),
    ("n", pa.int64()),
    ("correct", pa.int64()),
    ("wrong", pa.int64()),
    ("unparseable", pa.int64()),
    ("timeout", pa.int64()),
    ("error", pa.int64()),
    ("pass_rate", pa.float64()),
    ("stale_age", pa.int32()),  # 0: measured on this snapshot's checkpoint; k: carried k refreshes
    ("snapshot_id", pa.string()),
])
# Counts carried across a lineage's refreshes (paced/curriculum/carryover.py): `n`/`correct` stay
# the integer counts of the row's fresh samples; `evidence_n`/`evidence_correct` are the
# discounted counts the estimate (`pass_rate`) rests on and `carried_share` how much of them is
# carried. Written by lineage refreshes; a file without them (`paced refresh`, older snapshots)
# reads with evidence = the counts (`fill_evidence`).
EVIDENCE_FIELDS = (("evidence_n", pa.float64()), ("evidence_correct", pa.float64()),
                   ("carried_share", pa.float64()))


def fill_evidence(table: pa.Table) -> pa.Table:
    """The snapshot rows with their evidence columns (paced/curriculum/carryover.py); a table
    without them (written before carry-over, or by `paced refresh`) gets evidence = its counts
    and a carried share of 1 for rows carried from an earlier checkpoint (stale_age > 0), else 0."""
    missing = [(name, t) for name, t in EVIDENCE_FIELDS if name not in table.column_names]
    if not missing:
        return table
    n = table["n"].to_numpy(zero_copy_only=False).astype(np.float64)
    stale = table["stale_age"].to_numpy(zero_copy_only=False) > 0 if "stale_age" in table.column_names \
        else np.zeros(len(n), dtype=bool)
    values = {"evidence_n": n,
              "evidence_correct": table["correct"].to_numpy(zero_copy_only=False).astype(np.float64),
              "carried_share": np.where(stale & (n > 0), 1.0, 0.0)}
    for name, t in missing:
        table = table.append_column(pa.field(name, t), pa.array(values[name], t))
    return table


SNAPSHOT_SCHEMA = pa.schema([*COUNTS_SCHEMA, *(pa.field(name, t) for name, t in EVIDENCE_FIELDS)])


LOCK_FILE = ".lock"


def snapshot_hint(student_id: str) -> str:
    return f"run `paced refresh --student {student_id}` to rebuild it from its rollouts"


@contextmanager
def snapshot_lock(home: Home, student_id: str, timeout_seconds: float = 600.0) -> Iterator[None]:
    """Hold the writer lock of a student's snapshots (an `flock`, released by the kernel if its
    holder dies), waiting up to `timeout_seconds` for another writer to finish; ConflictError
    after that. Two refreshes never write the same rows under two snapshot ids."""
    folder = make_dirs(home.snapshots_dir(student_id))
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if time.monotonic() >= deadline:
                    raise ConflictError(f"another job has been writing snapshots of {student_id!r} for over "
                                        f"{timeout_seconds:.0f} s; try again later", code="busy",
                                        detail={"folder": str(folder)}) from err
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def new_snapshot_id(content_key: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    digest = hashlib.sha256(content_key.encode()).hexdigest()[:8]
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest}"


def list_snapshots(home: Home, student_id: str) -> list[str]:
    """Snapshot ids of a student, oldest first."""
    folder = home.snapshots_dir(student_id)
    return sorted(p.stem for p in folder.glob("*.parquet")) if folder.exists() else []


def list_students(home: Home) -> list[str]:
    root = home.root / "snapshots"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.parquet"))) \
        if root.exists() else []


def snapshot_path(home: Home, student_id: str, snapshot_id: str | None = None) -> Path:
    """The file of `snapshot_id`, or of the newest snapshot when None."""
    ids = list_snapshots(home, student_id)
    if not ids:
        raise NotFoundError(f"no pass-rate snapshot for student {student_id!r}; run `paced rollout` "
                            "then `paced refresh`", detail={"field": "student_id", "value": student_id})
    if snapshot_id is None:
        snapshot_id = ids[-1]
    elif snapshot_id not in ids:
        raise NotFoundError(f"student {student_id!r} has no snapshot {snapshot_id!r}",
                            detail={"field": "snapshot_id", "value": snapshot_id})
    return home.snapshots_dir(student_id) / f"{validate_name(snapshot_id, 'snapshot_id')}.parquet"


def read_snapshot(home: Home, student_id: str, snapshot_id: str | None = None,
                  dataset: str | None = None) -> pa.Table:
    """A snapshot's rows (SNAPSHOT_SCHEMA, evidence columns filled in for files without
    them), optionally only one data set's."""
    path = snapshot_path(home, student_id, snapshot_id)
    table = fill_evidence(read_parquet_checked(path, snapshot_hint(student_id)))
    if dataset is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["dataset"], dataset))
    return table


def read_snapshot_rows(home: Home, student_id: str, snapshot_id: str | None = None,
                       dataset: str | None = None) -> tuple[pa.Table, str]:
    """`read_snapshot` with the snapshot's id resolved (the newest when None); NotFoundError
    when `dataset` is given and the snapshot has no rows of it."""
    sid = snapshot_path(home, student_id, snapshot_id).stem
    table = read_snapshot(home, student_id, sid, dataset=dataset)
    if dataset is not None and table.num_rows == 0:
        raise NotFoundError(f"snapshot {sid} of {student_id!r} has no pass rates for data set {dataset!r}",
                            detail={"field": "dataset", "value": dataset})
    return table, sid


def write_snapshot(home: Home, student_id: str, table: pa.Table, snapshot_id: str, *,
                   repair: bool = False) -> Path:
    """Commit a snapshot (rows sorted by dataset, problem id) under its id. Never overwrites,
    except with `repair`: a damaged file is replaced by the rows recomputed from its inputs.
    Rows without evidence columns are written without them (COUNTS_SCHEMA)."""
    path = home.snapshots_dir(student_id) / f"{validate_name(snapshot_id, 'snapshot_id')}.parquet"
    if path.exists() and not repair:
        raise FileExistsError(path)
    table = table.cast(SNAPSHOT_SCHEMA if "evidence_n" in table.column_names else COUNTS_SCHEMA)
    if not _sorted(table):
        table = table.sort_by([("dataset", "ascending"), ("problem_id", "ascending")])
    return write_parquet_atomic(path, table)


def _sorted(table: pa.Table) -> bool:
    """Whether rows are already in (dataset, problem_id) order (one pass; sorting 10⁶ rows is not)."""
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return True
    d, p = table["dataset"], table["problem_id"]
    d0, d1, p0, p1 = d.slice(0, len(d) - 1), d.slice(1), p.slice(0, len(p) - 1), p.slice(1)
    ok = pc.or_(pc.less(d0, d1), pc.and_(pc.equal(d0, d1), pc.less_equal(p0, p1)))
    return pc.all(ok).as_py() is not False


def measured_chat_template(home: Home, student_id: str, snapshot_id: str) -> bool | None:
    """Whether the rollouts that measured a snapshot rendered prompts with the chat template
    (its side record's sampling config); None when the snapshot records no sampling."""
    record = read_snapshot_record(home, student_id, snapshot_id)
    sampling = (record.sampling or {}) if record else {}
    return bool(sampling["chat_template"]) if "chat_template" in sampling else None


# ---------------------------------------------------------------- the side record


@dataclass(frozen=True, kw_only=True)
class SnapshotRecord:
    """What `snapshots/{student}/{snapshot_id}.json` says about one snapshot."""

    snapshot_id: str
    student_id: str
    sampling_hash: str | None = None
    sampling: dict | None = None  # the rollout config's record (temperature, max_new_tokens, base_seed...)
    fingerprint: str | None = None  # of the inputs: a refresh with the same inputs writes nothing
    problems: int = 0
    datasets: list[str] = field(default_factory=list)
    paced_version: str = __version__
    inputs: list[dict] | None = None  # `paced refresh`: the rollout batch files aggregated
    lineage: dict | None = None  # a lineage refresh: its record (key, checkpoint, carried, ...)
    history: list[dict] | None = None  # a lineage refresh: the records of the lineage so far

    def to_json(self) -> dict:
        """The side file's JSON (keys a snapshot kind does not use are left out, as always)."""
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None or k in ("sampling", "fingerprint")}

    @classmethod
    def from_json(cls, data: dict, where: str = "a snapshot side file") -> SnapshotRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or "snapshot_id" not in data or "student_id" not in data:
            raise SchemaError(f"{where} is not a snapshot record (a JSON object with snapshot_id and "
                              f"student_id): {SIDE_HINT}")
        return cls(**{k: v for k, v in data.items() if k in names})


# what to do about a side file that does not read
SIDE_HINT = "move it aside and rerun `paced refresh`: a new snapshot is written"


def snapshot_record_path(home: Home, student_id: str, snapshot_id: str) -> Path:
    return home.snapshots_dir(student_id) / f"{validate_name(snapshot_id, 'snapshot_id')}.json"


def read_snapshot_record(home: Home, student_id: str, snapshot_id: str) -> SnapshotRecord | None:
    """The side record of one snapshot (None when it has none); a file that does not read as a
    JSON object is a `DamagedError` naming it."""
    return _read_record(snapshot_record_path(home, student_id, snapshot_id), student_id, snapshot_id)


def _read_record(path: Path, student_id: str, snapshot_id: str) -> SnapshotRecord | None:
    if not path.exists():
        return None
    data = read_json_object(path, SIDE_HINT)
    # the path names the snapshot where an older writer left the ids out
    return SnapshotRecord.from_json({"snapshot_id": snapshot_id, "student_id": student_id, **data}, str(path))


def write_snapshot_record(home: Home, record: SnapshotRecord) -> Path:
    """Write (atomically) the side record; before the snapshot it describes."""
    path = snapshot_record_path(home, record.student_id, record.snapshot_id)
    make_dirs(path.parent)
    write_json_atomic(path, record.to_json())
    return path


def snapshot_records(home: Home, student_id: str) -> Iterator[SnapshotRecord]:
    """Every side record of a student's snapshots, by snapshot id."""
    folder = home.snapshots_dir(student_id)
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        yield _read_record(path, student_id, path.stem)
