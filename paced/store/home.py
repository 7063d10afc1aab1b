"""The data home (`PACED_HOME`, default `./paced-data`): where every job reads and writes.

Layout (schema version 1)::

    SCHEMA_VERSION.json                          {"schema_version": 1, "paced_version": ...}
    problems/{dataset}/dataset.json              grader and import history
    problems/{dataset}/part-{seq:05d}.parquet    immutable, one per import that added rows
    rollouts/{student}/{sampling}/{dataset}/batch-{seq:08d}.parquet, sampling.json
    references/{dataset}/{teacher}/batch-{seq:08d}.parquet, done-{seq:08d}.json
    snapshots/{student}/{snapshot_id}.parquet    immutable pass-rate snapshots
    manifests/{name}/                            manifest.parquet, shard-*.parquet, manifest.json
    service/state.duckdb                         the service's own mutable state (runs, leases)
    models/                                      cached built-in models
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from paced import __version__
from paced.errors import InputError, SchemaError
from paced.store.files import read_json, write_json_atomic

SCHEMA_VERSION = 1
SCHEMA_FILE = "SCHEMA_VERSION.json"
DEFAULT_HOME = "./paced-data"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(value: str, what: str) -> str:
    """Names that reach the filesystem: letters, digits, `.`, `_`, `-`; no path tricks."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise InputError(
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="bad_name",
            detail={"field": what, "value": str(value)[:200]},
        )
    return value


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """`--home` if given, else `$PACED_HOME`, else `./paced-data`."""
    return Path(home or os.environ.get("PACED_HOME") or DEFAULT_HOME).expanduser().resolve()


def add_home_argument(parser: argparse.ArgumentParser, help_: str | None = None) -> None:
    """The `--home DIR` flag every command takes (resolved later by `resolve_home`)."""
    parser.add_argument("--home", default=None, metavar="DIR",
                        help=help_ or "data home (default: $PACED_HOME, else ./paced-data)")


@dataclass(frozen=True)
class Home:
    """Paths inside one data home. Construct with `open_home`."""

    root: Path

    def problems_dir(self, dataset: str) -> Path:
        return self.root / "problems" / validate_name(dataset, "dataset")

    def rollouts_dir(self, student_id: str, sampling_hash: str, dataset: str) -> Path:
        return (
            self.root / "rollouts" / validate_name(student_id, "student_id")
            / validate_name(sampling_hash, "sampling_hash") / validate_name(dataset, "dataset")
        )

    def references_dir(self, dataset: str, teacher_id: str) -> Path:
        return (
            self.root / "references" / validate_name(dataset, "dataset")
            / validate_name(teacher_id, "teacher_id")
        )

    def snapshots_dir(self, student_id: str) -> Path:
        return self.root / "snapshots" / validate_name(student_id, "student_id")

    def manifests_dir(self, name: str) -> Path:
        return self.root / "manifests" / validate_name(name, "manifest")

    @property
    def service_dir(self) -> Path:
        return self.root / "service"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"


def open_home(home: str | os.PathLike | None = None, *, create: bool = True) -> Home:
    """Open (and by default create) a data home, refusing one written by a newer schema."""
    root = resolve_home(home)
    marker = root / SCHEMA_FILE
    if marker.exists():
        try:
            version = int(read_json(marker, f"is {root} a paced data home?")["schema_version"])
        except (ValueError, KeyError, TypeError) as err:
            raise SchemaError(f"{marker} is unreadable; is {root} a paced data home?") from err
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"data home {root} was written by schema version {version}, but this paced "
                f"({__version__}) reads up to {SCHEMA_VERSION}: upgrade paced",
                detail={"home": str(root), "schema_version": version},
            )
    elif create:
        if root.exists() and not root.is_dir():
            raise InputError(f"data home {root} exists and is not a folder")
        write_json_atomic(marker, {"schema_version": SCHEMA_VERSION, "paced_version": __version__})
    else:
        raise InputError(f"{root} is not a paced data home (no {SCHEMA_FILE}); run `paced import` first")
    return Home(root)
