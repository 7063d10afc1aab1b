"""`paced train --group-size K --group-snapshot-every N`: the training samples become the
lineage's snapshots (no extra generation); a manifest rebuilt on them, a service run that
follows snapshots re-planned from them, a SIGKILL mid-refresh resumed into the same snapshot.
Tiny real models, the real grader, store and service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_trainer_group import K, group_args, group_home
from test_trainer_refresh import assert_same_weights, expected_weights
from test_trainer_service import TOKEN, create_run, service  # noqa: F401 - the `service` fixture
from trainer_helpers import build_models, summary_of, train_args

from paced.cli import main
from paced.curriculum import WeightScheme
from paced.jobs.lineage import read_lineage
from paced.store.files import read_json
from paced.store.home import open_home
from paced.store.rollouts import read_rollouts, rollout_sets
from paced.store.snapshots import list_snapshots, read_snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


def newest_counts(home: Path, lineage: str, steps: range) -> dict[str, tuple]:
    """problem -> (student, n, correct) of its newest step's committed training samples."""
    store, out = open_home(home, create=False), {}
    for s in steps:
        student = f"{lineage}-step{s}"
        if not (home / "rollouts" / student).exists():
            continue
        (found,) = rollout_sets(store, student)
        table = read_rollouts(list(found.files))
        per: dict[str, list] = defaultdict(lambda: [0, 0])
        for pid, outcome in zip(table["problem_id"].to_pylist(), table["outcome"].to_pylist(), strict=True):
            per[pid][0] += 1
            per[pid][1] += outcome == "correct"
        out |= {pid: (student, n, c) for pid, (n, c) in per.items()}
    return out


def check_snapshot(home: Path, lineage: str, record: dict, previous: pa.Table, first_step: int) -> pa.Table:
    """The record's snapshot: fresh rows = the newest group counts of the steps since the last
    snapshot, the rest carried one older."""
    store = open_home(home, create=False)
    snapshot = read_snapshot(store, lineage, record["snapshot_id"])
    fresh = newest_counts(home, lineage, range(first_step, record["step"]))
    assert fresh and record["rerolled"] == len(fresh) and record["rollout_tokens"] == 0
    assert record["samples"] == sum(n for _, n, _ in fresh.values())
    before = {r["problem_id"]: r for r in previous.to_pylist()}
    for row in snapshot.to_pylist():
        if row["problem_id"] in fresh:
            assert (row["student_id"], row["n"], row["correct"], row["stale_age"]) == (*fresh[row["problem_id"]], 0)
        else:
            old = before[row["problem_id"]]
            assert (row["student_id"], row["n"], row["correct"], row["stale_age"]) == \
                (old["student_id"], old["n"], old["correct"], old["stale_age"] + 1)
    assert snapshot.num_rows == previous.num_rows
    return snapshot


def test_training_samples_become_the_lineages_snapshots_and_the_next_manifest(models, tmp_path, capsys):
    home, manifest = group_home(tmp_path, capsys, n=6, scheme="paced-posterior")  # problems recur across steps
    out = tmp_path / "out"
    assert main(group_args(models, home, manifest, out, "--steps", "5", "--group-snapshot-every", "2",
                           "--group-scheme", "paced")) == 0
    summary = summary_of(capsys)
    store = open_home(home, create=False)
    base = read_json(manifest / "manifest.json")["inputs"]["snapshot_id"]
    refreshes = summary["refreshes"]
    assert [(r["kind"], r["step"], r["sample_steps"]) for r in refreshes] == [("samples", 2, [0, 1]),
                                                                             ("samples", 4, [2, 3])]
    assert list_snapshots(store, "s1") == [base, *(r["snapshot_id"] for r in refreshes)]
    assert summary["rollout_tokens"] == summary["rollout_samples"] == 0  # no extra generation
    step0, step1 = (set(newest_counts(home, "s1", range(s, s + 1))) for s in (0, 1))
    assert step0 & step1  # a problem trained in both steps counts its newest group (step 1's) only
    previous, first = read_snapshot(store, "s1", base), 0
    for r in refreshes:
        snapshot = check_snapshot(home, "s1", r, previous, first)
        assert read_lineage(store, "s1", r["snapshot_id"])["source"] == "training-samples"
        built = out / f"manifest-step{r['step']}"
        assert r["source"] == str(built)
        assert read_json(built / "manifest.json")["inputs"]["snapshot_id"] == r["snapshot_id"]
        weights = pq.read_table(built / "manifest.parquet")
        assert_same_weights(dict(zip(weights["problem_id"].to_pylist(), weights["weight"].to_pylist(), strict=True)),
                            expected_weights(snapshot, WeightScheme("paced-posterior")))
        previous, first = snapshot, r["step"]
    assert summary["source"] == refreshes[-1]["source"]


def test_group_snapshots_need_group_mode_and_exclude_refresh_every(models, tmp_path, capsys):
    home, manifest = group_home(tmp_path, capsys)
    args = train_args(models, manifest, tmp_path / "o", "--loss", "reverse", "--group-snapshot-every", "2")
    assert main(args) == 1
    assert "add --group-size" in capsys.readouterr().err
    assert main(group_args(models, home, manifest, tmp_path / "o", "--group-snapshot-every", "2",
                           "--refresh-every", "2")) == 1
    assert "choose one" in capsys.readouterr().err
