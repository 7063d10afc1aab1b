"""Named SQL statements from `paced/sql/*.sql`, and DuckDB connections passed explicitly.

A `.sql` file holds blocks introduced by `-- name: NAME`; `statement("file.NAME")` returns the
text. Python binds values with `?`/`$name` parameters and never formats SQL strings. Parquet
globs are bound as parameters too (`read_parquet(?)` takes a list of paths).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

import duckdb

from paced.errors import PacedError

_BLOCK_RE = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)


@cache
def _statements(file: str) -> dict[str, str]:
    text = resources.files("paced.sql").joinpath(f"{file}.sql").read_text()
    parts = _BLOCK_RE.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2])}


def statement(qualified_name: str) -> str:
    """The SQL text of `file.name`, e.g. `statement("passrates.aggregate")`."""
    file, _, name = qualified_name.partition(".")
    try:
        return _statements(file)[name]
    except (KeyError, FileNotFoundError) as err:
        raise PacedError(f"no SQL statement {qualified_name!r}", code="internal") from err


def connect(path: str | Path | None = None, *, read_only: bool = False, threads: int | None = None):
    """A new DuckDB connection (in memory when `path` is None). Never DuckDB's default one."""
    config = {} if threads is None else {"threads": threads}
    if path is None:
        return duckdb.connect(":memory:", config=config)
    return duckdb.connect(str(path), read_only=read_only, config=config)



def query_arrow(con, sql: str, params=None):
    """Run a statement and return its rows as an Arrow table, without an extra copy."""
    rel = con.sql(sql, params=params)
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow  # DuckDB >= 2 / 1.x
    return fetch()


def query_files(con, sql: str, params, files, hint: str = ""):
    """`query_arrow` over Parquet `files`; when DuckDB cannot read them, `DamagedError` naming
    the first file that does not read (checked only after a failure: no cost when all is well)."""
    from paced.store.files import find_damaged

    try:
        return query_arrow(con, sql, params)
    except duckdb.Error:
        find_damaged(files, hint)
        raise
