"""Shard rows: manifest items joined with prompts and teacher references.

Rows follow the prompt–completion format Hugging Face TRL trainers read (`prompt`,
`completion`), plus `problem_id`, `weight`, `pass_rate`, `n`, `dataset`, `guard` and `answer` (the
problem's reference answer: on-policy group training grades samples against it), so an
external trainer needs no conversion. `completion` is the teacher's verified reference (null
where the problem has none: on-policy training needs only the prompt).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from paced.store.home import Home
from paced.store.problems import part_files
from paced.store.sql import connect, query_files, statement

REFERENCE_SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("dataset", pa.string()),
    ("teacher_id", pa.string()),
    ("response", pa.string()),
    ("attempt", pa.int32()),  # which try produced it (the lowest verified one is served)
])

SHARD_SCHEMA = pa.schema([
    ("position", pa.int64()),
    ("problem_id", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("weight", pa.float64()),
    ("pass_rate", pa.float64()),
    ("n", pa.int64()),
    ("dataset", pa.string()),
    ("guard", pa.string()),
    ("answer",
     pa.string()),  # the problem's reference answer: the grader's key and {answer} of a teacher template
])


def reference_files(home: Home, dataset: str, teacher_id: str | None = None) -> list[Path]:
    """Reference batch files of a data set: one teacher's, or (None) the first teacher's by id."""
    root = home.root / "references" / dataset
    if not root.exists():
        return []
    teachers = [teacher_id] if teacher_id else sorted(p.name for p in root.iterdir() if p.is_dir())
    for teacher in teachers:
        files = sorted(home.references_dir(dataset, teacher).glob("batch-*.parquet"))
        if files:
            return files
    return []


def assemble_rows(home: Home, items: pa.Table, dataset: str, guard: str = "none",
                  teacher_id: str | None = None, con=None) -> pa.Table:
    """SHARD_SCHEMA rows for manifest `items` (position, problem_id, weight, pass_rate, n)."""
    con = con or connect()
    refs = [str(p) for p in reference_files(home, dataset, teacher_id)]
    params = {"problem_files": [str(p) for p in part_files(home, dataset)], "dataset": dataset,
              "guard": guard}
    con.register("items", items)
    try:
        if refs:
            sql, params["ref_files"] = statement("shards.assemble"), refs
        else:
            sql = statement("shards.assemble_no_refs")
        table = query_files(con, sql, params, [*params["problem_files"], *refs],
                            "restore it from a backup, or import (or collect) it again")
    finally:
        con.unregister("items")
    return table.cast(SHARD_SCHEMA)
