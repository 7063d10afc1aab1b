"""Atomic file writes: everything paced stores is written to a temporary name and renamed.

A reader never sees half a file; a killed writer leaves at most a `.tmp-*` file behind, which
readers ignore (they only glob the final names) and `sweep_temp_files` removes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def _temp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    return Path(name)


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    """Write `obj` as pretty, key-sorted JSON (stable bytes for the same object)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(path, text.encode())


def write_parquet_atomic(path: Path, table: pa.Table, **kwargs: Any) -> Path:
    """Write an Arrow table as Parquet, atomically. Deterministic for the same table."""
    path = Path(path)
    tmp = _temp_path(path)
    kwargs.setdefault("compression", "zstd")
    try:
        pq.write_table(table, tmp, **kwargs)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sweep_temp_files(folder: Path) -> int:
    """Remove temporary files a killed writer left under `folder`; returns how many."""
    count = 0
    for tmp in Path(folder).rglob(TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count
