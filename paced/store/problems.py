"""Problems in the data home: `problems/{dataset}/part-*.parquet` plus `dataset.json`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from paced.errors import InputError, NotFoundError
from paced.store.files import read_json_object, write_json_atomic, write_parquet_atomic
from paced.store.home import Home
from paced.store.sql import connect, query_files, statement

PROBLEM_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt", pa.string()),
    ("answer", pa.string()),
    ("difficulty", pa.int32()),
    ("metadata", pa.string()),  # JSON object of the source's other columns
])
GRADERS = ("math", "exact", "numeric")
PART_HINT = "restore it from a backup, or import the source again into a new data set"


def part_files(home: Home, dataset: str) -> list[Path]:
    return sorted(home.problems_dir(dataset).glob("part-*.parquet"))


def dataset_info(home: Home, dataset: str) -> dict:
    """`dataset.json`: the grader and import history. NotFoundError if never imported."""
    path = home.problems_dir(dataset) / "dataset.json"
    if not path.exists() or not part_files(home, dataset):
        raise NotFoundError(f"data set {dataset!r} not found in {home.root}; import it with `paced import`",
                            detail={"field": "dataset", "value": dataset})
    return read_json_object(path, PART_HINT)


def list_datasets(home: Home) -> list[str]:
    root = home.root / "problems"
    return sorted(p.parent.name for p in root.glob("*/dataset.json")) if root.exists() else []


def read_problems(home: Home, dataset: str, con=None) -> pa.Table:
    """All problems of a data set (PROBLEM_SCHEMA), ordered by id."""
    dataset_info(home, dataset)
    files = [str(p) for p in part_files(home, dataset)]
    con = con or connect()
    table = query_files(con, statement("problems.read_all"), {"files": files}, files, PART_HINT)
    return table.cast(PROBLEM_SCHEMA)


def write_problem_part(home: Home, dataset: str, table: pa.Table, grader: str, source: str) -> Path:
    """Commit new problems as the next immutable part file, then record the import."""
    folder = home.problems_dir(dataset)
    info_path = folder / "dataset.json"
    info = read_json_object(info_path, PART_HINT) if info_path.exists() else {"name": dataset,
                                                                              "grader": grader, "imports": []}
    if info["grader"] != grader:
        raise InputError(f"data set {dataset!r} is graded with {info['grader']!r}; "
                         f"cannot import with --grader {grader}", detail={"field": "grader"})
    if not info_path.exists():  # record the grader first: a part file never lacks its data set
        write_json_atomic(info_path, info)
    seq = len(part_files(home, dataset))
    path = write_parquet_atomic(folder / f"part-{seq:05d}.parquet", table.cast(PROBLEM_SCHEMA))
    info["imports"].append({"part": path.name, "rows": table.num_rows, "source": source})
    write_json_atomic(info_path, info)
    return path
