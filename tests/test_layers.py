"""The import rules between the package's layers (docs: the architecture review, Appendix A).

Every `from paced.X import ...` in `paced/` is checked against the layer it may not reach; an
upward or sideways import fails the test with its file and line. Two exceptions are written
down here, and only these: `paced/jobs/train.py` and `paced/jobs/diagnose.py`, the composition
roots of `paced train` and `paced diagnose`, build on the trainer; the trainer may use
`store.files` (atomic-write utilities, no data-home layout).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paced"

FORBIDDEN = {  # importer layer -> layers it must never import
    "curriculum": {"store", "jobs", "api", "trainer", "backends", "grading", "tasks", "cli"},
    "store": {"jobs", "api", "trainer", "cli", "curriculum"},
    "backends": {"store", "jobs", "api", "trainer", "cli"},
    "grading": {"store", "jobs", "api", "trainer", "cli"},
    "tasks": {"jobs", "api", "trainer", "cli"},
    "api": {"jobs", "trainer", "backends", "cli"},
    "jobs": {"api", "trainer", "cli"},
    "trainer": {"jobs", "api", "cli", "store",
                "integrations"},  # DESIGN §2: the service only over HTTP or shard files
    # the client of external trainers: light (no torch, no data home), only paced.errors below it
    "client": {"curriculum", "store", "jobs", "api", "trainer", "backends", "grading", "tasks", "cli",
               "integrations"},
    "integrations": {"curriculum", "store", "jobs", "api", "trainer", "backends", "grading", "tasks", "cli"},
}
ALLOWED = {  # (importing file, imported module prefix): the written exceptions
    ("jobs/train.py", "paced.trainer"),
    ("jobs/diagnose.py", "paced.trainer"),
    ("trainer/*", "paced.store.files"),
}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "paced" else parts[0]


def allowed(relative: str, module: str) -> bool:
    for where, prefix in ALLOWED:
        here = relative == where or (where.endswith("/*") and relative.startswith(where[:-1]))
        if here and (module == prefix or module.startswith(prefix + ".")):
            return True
    return False


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """`file:line: layer -> module (names)` for every import that breaks a rule."""
    rows = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        here = layer(".".join(("paced", *path.relative_to(package).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paced.")):
                continue
            if layer(node.module) in FORBIDDEN.get(here, ()) and not allowed(relative, node.module):
                names = ", ".join(a.name for a in node.names)
                rows.append(f"paced/{relative}:{node.lineno}: {here} -> {node.module} ({names})")
    return rows


def test_no_module_imports_a_layer_above_or_beside_it():
    rows = upward_imports()
    assert rows == [], "imports that break the layer rules:\n" + "\n".join(rows)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "trainer"
    bad.mkdir()
    (bad / "x.py").write_text("from paced.store.home import open_home\nfrom paced.store.files import "
                              "read_json\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "y.py").write_text("def f():\n    from paced.trainer.loop import train\n")
    assert upward_imports(tmp_path) == ["paced/jobs/y.py:2: jobs -> paced.trainer.loop (train)",
                                        "paced/trainer/x.py:1: trainer -> paced.store.home (open_home)"]
