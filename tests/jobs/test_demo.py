"""`paced demo --quick` end to end (real subprocess stages), and no orphan server on failure."""

import dataclasses
import subprocess
import sys

import psutil
import pytest

from paced.jobs.demo import DemoConfig, run_demo
from paced.tasks.builds import compute_file_hashes, read_shipped_record
from paced.tasks.pretrain import RECIPES

pytestmark = pytest.mark.slow

STAGES = ["import", "import-skill", "build-models", "teacher", "rollout", "refresh", "train-paced",
          "train-uniform", "evaluate-base", "evaluate-paced", "evaluate-uniform", "round2-rollout",
          "round2-refresh"]


def servers_for(home) -> list:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and str(home) in cmd:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "paced.cli", "demo", "--quick", "--home", str(home)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home, proc.stdout


def test_quick_demo_runs_every_stage_and_writes_its_files(demo_home):
    home, stdout = demo_home
    report = (home / "report.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in report and f"| {stage} |" in stdout
    assert "FAILED" not in report
    for png in ("passrate_histogram.png", "accuracy_by_difficulty.png"):
        assert (home / png).stat().st_size > 1000
    for arm in ("paced", "uniform"):
        assert (home / "demo" / arm / "final" / "config.json").exists()
    assert list((home / "snapshots" / "base").glob("*.parquet"))
    assert list((home / "snapshots" / "paced-round2").glob("*.parquet"))
    assert not servers_for(home)
    for name in ("quick-teacher", "quick-student"):  # the shipped weights, the same on every machine
        shipped = read_shipped_record(RECIPES[name])["files"]
        assert compute_file_hashes(home / "models" / name) == shipped


def test_a_failed_stage_stops_the_server_and_exits_nonzero(demo_home, capsys):
    home, _ = demo_home
    bad = dataclasses.replace(DemoConfig.for_mode(True), batch_size=0)  # `paced train` refuses it
    assert run_demo(home, bad) == 1
    report = (home / "report.md").read_text()
    assert "FAILED" in report and "train-paced" in report
    assert not servers_for(home)
