"""An epoch's shards, materialised once to disk and served as bytes.

When a run's epoch is created the service writes, under a temporary name renamed into place,
`home/service/runs/{run_id}/epoch-{e:05d}/`:

- `manifest.parquet`  the epoch's manifest items (position, problem_id, weight, pass_rate, n)
- `shards.jsonl`      every shard row (SHARD_SCHEMA) as one JSON object per line, in epoch order
                      (the whole epoch is itself a valid JSONL file; DuckDB writes it)
- `shards.pack`       each shard as a standalone Parquet file, concatenated
- `epoch.json`        snapshot id, counts, and the byte offsets of each shard in both files

Serving a shard is then a seek and a read: the same request returns the same bytes from any
process and across restarts, and a refresh writing new snapshots cannot change them.

A re-plan of a run that follows snapshots (`plans.py`) writes the same four files for its part
of the epoch into `epoch-{e:05d}/seg-{k:03d}/` (segment k ≥ 1), its positions continuing the
epoch's: its first shard is shard `from_shard` of the epoch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paced import __version__
from paced.curriculum import Manifest, shard_bounds
from paced.errors import NotFoundError, PacedError
from paced.store.files import (
    DIR_MODE,
    FILE_MODE,
    make_dirs,
    read_json,
    write_json_atomic,
    write_parquet_atomic,
)
from paced.store.home import Home
from paced.store.shards import assemble_rows
from paced.store.sql import connect, statement

EPOCH_FILE = "epoch.json"
FORMATS = ("json", "jsonl", "parquet")
MEDIA_TYPES = {"json": "application/json", "jsonl": "application/jsonl",
               "parquet": "application/vnd.apache.parquet"}


@dataclass(frozen=True)
class EpochFiles:
    """One materialised epoch: where its files are and where each shard starts in them."""

    folder: Path
    run_id: str
    epoch: int
    snapshot_id: str
    items: int
    shard_size: int
    effective_sample_size: float
    jsonl_offsets: tuple[int, ...]  # shards + 1 byte offsets into shards.jsonl
    parquet_offsets: tuple[int, ...]  # shards + 1 byte offsets into shards.pack
    segment: int = 0  # 0: the epoch as first built; k: its k-th re-plan
    from_shard: int = 0  # the epoch's shard index of this segment's shard 0

    @property
    def shards(self) -> int:
        return len(self.jsonl_offsets) - 1

    def shard_items(self, shard: int) -> int:
        return min(self.shard_size, self.items - shard * self.shard_size)


def epoch_folder(home: Home, run_id: str, epoch: int, segment: int = 0) -> Path:
    """The folder of an epoch's segment (0: the epoch's own). `run_id` is generated and
    validated by the service before it reaches here."""
    folder = home.service_dir / "runs" / run_id / f"epoch-{epoch:05d}"
    return folder / f"seg-{segment:03d}" if segment else folder


def line_offsets(path: Path, every: int, chunk_bytes: int = 1 << 24) -> list[int]:
    """Byte offsets of line 0, line `every`, line 2·`every`, …, and the end of the file."""
    offsets, lines, pos = [0], 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + pos + 1  # just after each newline
            counts = np.arange(lines + 1, lines + len(ends) + 1)  # lines read once each newline is
            offsets.extend(int(x) for x in ends[counts % every == 0])
            lines += len(ends)
            pos += len(chunk)
    if offsets[-1] != pos:  # a last, short shard
        offsets.append(pos)
    return offsets


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_jsonl(rows: pa.Table, path: Path, shard_size: int) -> list[int]:
    """shards.jsonl (written by DuckDB: compact, shortest round-trip floats); its shard offsets."""
    con = connect()
    con.register("shard_rows", rows)
    con.execute(statement("service.write_jsonl"), {"path": str(path)})
    con.close()
    return line_offsets(path, shard_size)


def _write_shards(rows: pa.Table, bounds: list[tuple[int, int]], folder: Path,
                  shard_size: int) -> tuple[list[int], list[int]]:
    """shards.jsonl and shards.pack, side by side (DuckDB and Parquet's writer release the GIL)."""
    with ThreadPoolExecutor(1, thread_name_prefix="paced-jsonl") as pool:
        jsonl = pool.submit(_write_jsonl, rows, folder / "shards.jsonl", shard_size)
        parquet_offsets = [0]
        with open(folder / "shards.pack", "wb") as pack:
            for start, stop in bounds:
                buf = io.BytesIO()
                pq.write_table(rows.slice(start, stop - start), buf, compression="zstd")
                pack.write(buf.getvalue())
                parquet_offsets.append(pack.tell())
        jsonl_offsets = jsonl.result()
    for name in ("shards.jsonl", "shards.pack"):
        _fsync(folder / name)
    if len(jsonl_offsets) != len(parquet_offsets):
        raise PacedError(f"shards.jsonl has {len(jsonl_offsets) - 1} shards, expected {len(bounds)}",
                         code="internal")
    return jsonl_offsets, parquet_offsets


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_epoch(home: Home, run_id: str, manifest: Manifest, snapshot_id: str, dataset: str,
                shard_size: int, teacher_id: str | None = None, *, segment: int = 0, from_shard: int = 0,
                extra: dict | None = None) -> EpochFiles:
    """Materialise an epoch's shards (atomically, as a folder). An existing epoch is kept as is.
    `segment` ≥ 1: a re-plan starting at the epoch's shard `from_shard` (its positions are shifted
    to follow the shards before it). `extra`: more to record in epoch.json."""
    folder = epoch_folder(home, run_id, manifest.epoch, segment)
    if (folder / EPOCH_FILE).exists():
        return read_epoch(folder)
    items = manifest.items
    if from_shard:
        offset = pa.array(np.arange(items.num_rows, dtype=np.int64) + from_shard * shard_size)
        items = items.set_column(items.schema.get_field_index("position"), "position", offset)
    rows = assemble_rows(home, items, dataset, manifest.scheme.guard, teacher_id)
    bounds = shard_bounds(manifest.num_items, shard_size)
    make_dirs(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}.", dir=folder.parent))
    try:
        tmp.chmod(DIR_MODE)
        write_parquet_atomic(tmp / "manifest.parquet", items)
        jsonl_offsets, parquet_offsets = _write_shards(rows, bounds, tmp, shard_size)
        for name in ("shards.jsonl", "shards.pack"):
            (tmp / name).chmod(FILE_MODE)
        info = {"run_id": run_id, "epoch": manifest.epoch, "snapshot_id": snapshot_id,
                "items": manifest.num_items, "shard_size": shard_size,
                "effective_sample_size": manifest.effective_sample_size, "paced_version": __version__,
                "segment": segment, "from_shard": from_shard, "seed": manifest.seed, **(extra or {}),
                "jsonl_offsets": jsonl_offsets, "parquet_offsets": parquet_offsets}
        write_json_atomic(tmp / EPOCH_FILE, info)
        tmp.rename(folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_epoch(folder)


def read_epoch(folder: Path) -> EpochFiles:
    path = folder / EPOCH_FILE
    if not path.exists():
        raise NotFoundError(f"epoch files {folder.name} not found", detail={"field": "epoch"})
    info = read_json(path)
    return EpochFiles(
        folder=folder, run_id=info["run_id"], epoch=int(info["epoch"]), snapshot_id=info["snapshot_id"],
        items=int(info["items"]), shard_size=int(info["shard_size"]),
        effective_sample_size=float(info["effective_sample_size"]),
        jsonl_offsets=tuple(info["jsonl_offsets"]), parquet_offsets=tuple(info["parquet_offsets"]),
        segment=int(info.get("segment", 0)), from_shard=int(info.get("from_shard", 0)),
    )


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(stop - start)


def shard_jsonl(files: EpochFiles, shard: int) -> bytes:
    return _read_range(files.folder / "shards.jsonl", files.jsonl_offsets[shard],
                       files.jsonl_offsets[shard + 1])


def items_array(jsonl: bytes) -> bytes:
    """JSONL lines as one JSON array (a newline never occurs inside a JSON-encoded line)."""
    return b"[" + jsonl.rstrip(b"\n").replace(b"\n", b",") + b"]"


def json_with_items(head: dict, jsonl: bytes) -> bytes:
    """`head` as a JSON object with an `items` array spliced in from JSONL bytes (deterministic)."""
    prefix = json.dumps(head, sort_keys=True, separators=(",", ":"))[:-1]
    return prefix.encode() + (b',"items":' if head else b'"items":') + items_array(jsonl) + b"}"


def shard_bytes(files: EpochFiles, shard: int, fmt: str) -> bytes:
    """Shard `shard` of the segment as `json`, `jsonl` or `parquet` bytes (JSON names it by its
    index in the epoch)."""
    if not 0 <= shard < files.shards:
        raise NotFoundError(f"epoch {files.epoch} of run {files.run_id} has {files.shards} shards; "
                            f"no shard {shard}", detail={"field": "shard", "value": shard})
    if fmt == "parquet":
        return _read_range(files.folder / "shards.pack", files.parquet_offsets[shard],
                           files.parquet_offsets[shard + 1])
    jsonl = shard_jsonl(files, shard)
    if fmt == "jsonl":
        return jsonl
    head = {"run_id": files.run_id, "epoch": files.epoch, "shard": files.from_shard + shard,
            "snapshot_id": files.snapshot_id}
    return json_with_items(head, jsonl)
