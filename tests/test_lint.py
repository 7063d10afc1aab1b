"""The house rules ruff checks (pyproject.toml [tool.ruff]: imports, bugbear, pyupgrade and lines
of at most 110 columns) hold over paced, tests and bench."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                          "paced", "tests", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
