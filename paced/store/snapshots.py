"""Pass-rate snapshots: `snapshots/{student}/{snapshot_id}.parquet`, immutable once written.

A snapshot id sorts by creation time (`YYYYMMDDTHHMMSSffffffZ-<hash8>`), so the newest snapshot
is the greatest file name. Readers list final names only (never `.tmp-*`), so a refresh that
runs while the service reads can never show half a snapshot: readers see the old snapshot
until the rename puts the new one in place.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from paced.errors import NotFoundError
from paced.store.files import write_parquet_atomic
from paced.store.home import Home, validate_name

SNAPSHOT_SCHEMA = pa.schema([
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
    """A snapshot's rows (SNAPSHOT_SCHEMA), optionally only one data set's."""
    table = pq.read_table(snapshot_path(home, student_id, snapshot_id))
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


def write_snapshot(home: Home, student_id: str, table: pa.Table, snapshot_id: str) -> Path:
    """Commit a snapshot (rows sorted by dataset, problem id) under its id. Never overwrites."""
    path = home.snapshots_dir(student_id) / f"{validate_name(snapshot_id, 'snapshot_id')}.parquet"
    if path.exists():
        raise FileExistsError(path)
    table = table.cast(SNAPSHOT_SCHEMA).sort_by([("dataset", "ascending"), ("problem_id", "ascending")])
    return write_parquet_atomic(path, table)
