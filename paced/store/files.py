"""Atomic file writes: everything paced stores is written to a temporary name and renamed.

A reader never sees half a file; a killed writer leaves at most a `.tmp-*` file behind, which
readers ignore (they only glob the final names) and `sweep_temp_files` removes.

Modes: data files are written 0640 and folders created 0750 (group-readable, so a trainer
running as another user of the same group can read shards, problems and snapshots); the
service keeps its own state private (see `paced/api/state.py`). A file that cannot be read back
(truncated Parquet, broken JSON, a folder where a file should be) raises `DamagedError` naming
it; `read_json` and `find_damaged` are the checks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paced.errors import DamagedError

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o640  # data files: owner rw, group r
DIR_MODE = 0o750  # data folders: owner rwx, group rx


def make_dirs(folder: Path) -> Path:
    """Create `folder` and its missing parents, each with DIR_MODE (a stricter umask still applies;
    `Path.mkdir(parents=True)` would give the parents the umask's default instead)."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(exist_ok=True, mode=DIR_MODE)
    return folder


def _temp_path(path: Path) -> Path:
    make_dirs(path.parent)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
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


def read_json(path: Path, hint: str = "") -> Any:
    """A JSON file's value; `DamagedError` naming the file when it is not readable JSON (a
    missing file is FileNotFoundError, as for any read)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError as err:
        raise damaged(path, "is a folder, not a JSON file", hint) from err
    except UnicodeDecodeError as err:
        raise damaged(path, f"is not UTF-8 text (byte {err.start})", hint) from err
    except (json.JSONDecodeError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deeply"
        raise damaged(path, f"is not valid JSON ({reason})", hint) from err


def read_json_object(path: Path, hint: str = "") -> dict:
    """`read_json` of a file that must hold a JSON object."""
    value = read_json(path, hint)
    if not isinstance(value, dict):
        raise damaged(Path(path), f"holds a JSON {type(value).__name__}, not an object", hint)
    return value


def damaged(path: Path, reason: str, hint: str = "") -> DamagedError:
    return DamagedError(f"damaged file {path}: {reason}" + (f"; {hint}" if hint else ""),
                        detail={"path": str(path), "reason": reason})


def parquet_problem(path: Path) -> str | None:
    """Why a Parquet file cannot be read in full (None: it reads)."""
    try:
        pq.read_table(path)
    except IsADirectoryError:
        return "is a folder, not a Parquet file"
    except (pa.ArrowException, OSError, ValueError) as err:
        return f"is not a readable Parquet file ({str(err).splitlines()[0][:200]})"
    return None


def find_damaged(files, hint: str = "") -> None:
    """Raise `DamagedError` for the first of `files` that does not read as Parquet."""
    for path in files:
        reason = parquet_problem(Path(path))
        if reason is not None:
            raise damaged(Path(path), reason, hint)


def read_parquet_checked(path: Path, hint: str = "", **kwargs: Any) -> pa.Table:
    """`pq.read_table`, with `DamagedError` naming the file when it does not read."""
    try:
        return pq.read_table(path, **kwargs)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        find_damaged([path], hint)
        raise damaged(Path(path), f"is not readable ({err})", hint) from err


def sweep_temp_files(folder: Path) -> int:
    """Remove temporary files a killed writer left under `folder`; returns how many."""
    count = 0
    for tmp in Path(folder).rglob(TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count
