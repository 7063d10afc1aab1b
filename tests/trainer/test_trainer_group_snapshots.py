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
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_trainer_group import group_args, group_home, untag
from test_trainer_refresh import assert_same_weights, expected_weights
from test_trainer_service import TOKEN, create_run, service  # noqa: F401 - the `service` fixture
from trainer_helpers import build_models, summary_of, train_args

from paced.cli import main
from paced.curriculum import WeightScheme
from paced.jobs.group_rollouts import run_tag
from paced.jobs.lineage import read_lineage
from paced.store.files import read_json
from paced.store.home import open_home
from paced.store.rollouts import read_rollouts, rollout_sets
from paced.store.snapshots import list_snapshots, read_snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


def newest_counts(home: Path, prefix: str, steps: range) -> dict[str, tuple]:
    """problem -> (student, n, correct) of its newest step's committed training samples
    (`prefix`: the run's `{lineage}-{run}`)."""
    store, out = open_home(home, create=False), {}
    for s in steps:
        student = f"{prefix}-step{s}"
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


def check_snapshot(home: Path, lineage: str, record: dict, previous: pa.Table, first_step: int,
                   out: Path) -> pa.Table:
    """The record's snapshot: fresh rows = the newest group counts of the steps since the last
    snapshot (of the run training into `out`), the rest carried one older."""
    store = open_home(home, create=False)
    snapshot = read_snapshot(store, lineage, record["snapshot_id"])
    fresh = newest_counts(home, f"{lineage}-{run_tag(out)}", range(first_step, record["step"]))
    assert fresh and record["rerolled"] == len(fresh) and record["rollout_tokens"] == 0
    assert record["samples"] == sum(n for _, n, _ in fresh.values())
    before = {r["problem_id"]: r for r in previous.to_pylist()}
    for row in snapshot.to_pylist():
        if row["problem_id"] in fresh:
            assert (row["student_id"], row["n"], row["correct"],
                    row["stale_age"]) == (*fresh[row["problem_id"]], 0)
        else:
            old = before[row["problem_id"]]
            assert (row["student_id"], row["n"], row["correct"], row["stale_age"]) == \
                (old["student_id"], old["n"], old["correct"], old["stale_age"] + 1)
    assert snapshot.num_rows == previous.num_rows
    return snapshot


def test_training_samples_become_the_lineages_snapshots_and_the_next_manifest(models, tmp_path, capsys):
    home, manifest = group_home(tmp_path, capsys, n=6,
                                scheme="paced-posterior")  # problems recur across steps
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
    step0, step1 = (set(newest_counts(home, f"s1-{run_tag(out)}", range(s, s + 1))) for s in (0, 1))
    assert step0 & step1  # a problem trained in both steps counts its newest group (step 1's) only
    previous, first = read_snapshot(store, "s1", base), 0
    for r in refreshes:
        snapshot = check_snapshot(home, "s1", r, previous, first, out)
        assert read_lineage(store, "s1", r["snapshot_id"])["source"] == "training-samples"
        built = out / f"manifest-step{r['step']}"
        assert r["source"] == str(built)
        assert read_json(built / "manifest.json")["inputs"]["snapshot_id"] == r["snapshot_id"]
        weights = pq.read_table(built / "manifest.parquet")
        assert_same_weights(dict(zip(weights["problem_id"].to_pylist(), weights["weight"].to_pylist(),
                                     strict=True)),
                            expected_weights(snapshot, WeightScheme(name="paced-posterior")))
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


@pytest.mark.slow  # a `paced serve` subprocess
def test_a_run_that_follows_snapshots_re_plans_from_the_training_samples(
        models, service, tmp_path, capsys, monkeypatch):  # noqa: F811 - `service`: the imported fixture
    url, home = service
    run = create_run(url, shard_size=4, scheme="paced-posterior", follow_snapshots=True)
    run_url = f"{url}/v1/runs/{run['run_id']}"
    monkeypatch.setenv("PACED_TOKEN", TOKEN)
    args = [*train_args(models, run_url, tmp_path / "out", "--loss", "reverse"), "--steps", "5",
            "--group-size", "2",
            "--group-snapshot-every", "2", "--home", str(home.root), "--lease-ttl-seconds", "120"]
    assert main(args) == 0
    summary = summary_of(capsys)
    refreshes = summary["refreshes"]
    assert [(r["kind"], r["step"], r["student_id"], r["source"]) for r in refreshes] == \
        [("samples", 2, "s1", run_url), ("samples", 4, "s1", run_url)]
    assert summary["rollout_tokens"] == 0
    assert list_snapshots(home, "s1")[-2:] == [r["snapshot_id"] for r in refreshes]
    previous, first = read_snapshot(home, "s1", run["snapshot_id"]), 0
    for r in refreshes:
        previous, first = check_snapshot(home.root, "s1", r, previous, first, tmp_path / "out"), r["step"]
    # Each snapshot re-plans the rest of epoch 0 at the next lease: shards 2-3 from the first, 4 from the
    # second.
    view = httpx.get(run_url, timeout=30).json()
    history = [(h["epoch"], h["from_shard"], h["snapshot_id"],
                h["checkpoint_id"]) for h in view["snapshot_history"]]
    tag = run_tag(tmp_path / "out")
    assert history == [(0, 0, run["snapshot_id"], None),
                       (0, 2, refreshes[0]["snapshot_id"], f"s1-{tag}-step1"),
                       (0, 4, refreshes[1]["snapshot_id"], f"s1-{tag}-step3")]
    for shards, r in ((range(2, 4), refreshes[0]), (range(4, 5), refreshes[1])):
        want = expected_weights(read_snapshot(home, "s1", r["snapshot_id"]),
                                WeightScheme(name="paced-posterior"))
        weights = {}
        for k in shards:
            got = httpx.get(f"{run_url}/epochs/0/shards/{k}", params={"format": "parquet"}, timeout=30)
            assert got.status_code == 200, got.text
            table = pq.read_table(pa.BufferReader(got.content))
            weights |= dict(zip(table["problem_id"].to_pylist(), table["weight"].to_pylist(), strict=True))
        assert weights and set(weights) <= set(want)
        # the snapshot's weights, up to the re-plan's normalisation over the rest of the epoch
        ratios = np.array([weights[pid] / want[pid] for pid in sorted(weights)])
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)


@pytest.mark.slow  # fresh interpreters, two training runs
def test_sigkill_during_a_group_snapshot_then_resume_gives_the_same_snapshot(models, tmp_path, capsys):
    runs = {name: group_home(tmp_path / name, capsys, scheme="paced-posterior") for name in ("a", "b")}
    extra = ("--steps", "3", "--group-snapshot-every", "2", "--group-scheme", "paced")

    def args(name, *more):
        home, manifest = runs[name]
        return group_args(models, home, manifest, tmp_path / name / "out", *extra, *more)

    snapshots_b = runs["b"][0] / "snapshots" / "s1"
    before = set(snapshots_b.glob("*.json"))
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", *args("b")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # kill as soon as the snapshot's side file is written (its Parquet next)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline \
            and not set(snapshots_b.glob("*.json")) - before:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (side,) = set(snapshots_b.glob("*.json")) - before
    state = read_json(tmp_path / "b" / "out" / "checkpoint-2" / "trainer_state.json")
    assert state["pending_refresh"] == {"kind": "samples", "step": 2, "stage": 0,
                                        "round": 1}, "killed after it"
    assert main(args("b", "--resume")) == 0
    resumed = summary_of(capsys)
    assert main(args("a")) == 0
    straight = summary_of(capsys)
    (rb,), (ra,) = resumed["refreshes"], straight["refreshes"]
    assert rb["snapshot_id"] == side.stem  # the snapshot the killed run had named
    assert list_snapshots(open_home(runs["b"][0], create=False), "s1")[-1] == side.stem
    # the same snapshot rows and record, up to each run's own sample ids
    tables = [read_snapshot(open_home(runs[n][0], create=False), "s1", r["snapshot_id"]).drop(["snapshot_id"])
              for n, r in (("a", ra), ("b", rb))]
    for name, table in zip("ab", tables, strict=True):
        students = table["student_id"].to_pylist()
        assert any(run_tag(tmp_path / name / "out") in s for s in students)
        tables["ab".index(name)] = table.set_column(table.schema.get_field_index("student_id"), "student_id",
                                                    pa.array([untag(s) for s in students], pa.string()))
    assert tables[0].equals(tables[1]) and rb["rerolled"] == ra["rerolled"] == 8
    skip = ("snapshot_id", "previous_snapshot_id", "refresh_seconds", "source")
    same = [{k: untag(v) if k == "checkpoint_id" else v for k, v in r.items() if k not in skip}
            for r in (ra, rb)]
    assert same[0] == same[1]


def test_one_steps_samples_give_the_snapshot_refresh_lineage_gives_and_a_rerun_finds_it(tmp_path):
    """The same code path as `refresh_lineage`: one step's samples make the rows a lineage
    refresh of that step's student makes; a rerun (the Parquet lost to a kill) finds the same id."""
    from api_fixtures import make_service_home
    from test_trainer_refresh import fake_rollouts

    from paced.jobs.lineage import refresh_lineage
    from paced.jobs.sample_lineage import refresh_lineage_from_samples

    homes = [make_service_home(tmp_path / name, n=12) for name in ("a", "b")]
    ids = ["p0000001", "p0000004", "p0000009"]
    for home, _ in homes:
        fake_rollouts(home, "s1-step0", ids, k=4)
    (a, base_a), (b, base_b) = homes
    by_samples = refresh_lineage_from_samples(a, "s1", "arith", [("s1-step0", "h2"), ("s1-step1", "h3")],
                                              base_a)
    by_rollout = refresh_lineage(b, "s1", "s1-step0", "arith", "h2", base_b, problem_ids=ids)
    tables = [read_snapshot(h, "s1", s).drop(["snapshot_id"]) for h, s in ((a, by_samples), (b, by_rollout))]
    assert tables[0].equals(tables[1]) and tables[0].num_rows == 12
    assert read_lineage(a, "s1", by_samples)["checkpoints"] == ["s1-step0"]  # step 1 had no samples
    (a.snapshots_dir("s1") / f"{by_samples}.parquet").unlink()
    assert refresh_lineage_from_samples(a, "s1", "arith", [("s1-step0", "h2"), ("s1-step1", "h3")], base_a) \
        == by_samples
    assert read_snapshot(a, "s1", by_samples).drop(["snapshot_id"]).equals(tables[0])
    assert refresh_lineage_from_samples(a, "s1", "arith", [("s1-step1", "h3")], by_samples) is None
