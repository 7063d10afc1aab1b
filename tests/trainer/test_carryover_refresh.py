"""Carry-over in the lineage snapshots: evidence columns written by a lineage refresh, old snapshots
read as before, manifests and the service weigh by the evidence, and `paced train --carry-over-decay`
(tiny real models, a real data home)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from api_fixtures import make_service_home
from fastapi.testclient import TestClient
from test_trainer_refresh import assert_same_weights, fake_rollouts, home_with_manifest, manifest_weights
from trainer_helpers import build_models, parameters, summary_of, train_args

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.cli import main
from paced.curriculum import WeightScheme, compute_weights
from paced.curriculum.carryover import select_fresh
from paced.jobs.lineage import read_lineage, refresh_lineage
from paced.store.rollouts import batch_files, pass_counts
from paced.store.snapshots import COUNTS_SCHEMA, SNAPSHOT_SCHEMA, list_snapshots, read_snapshot

A, B = "m-aaaaaaaaaaaa", "m-bbbbbbbbbbbb"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("models"))


def rows_of(home, student, sid) -> dict:
    return {r["problem_id"]: r for r in read_snapshot(home, student, sid).to_pylist()}


def fresh_counts(home, checkpoint, k) -> dict:
    table = pass_counts(batch_files(home.rollouts_dir(checkpoint, "h2", "arith")), k)
    return {r["problem_id"]: (r["correct"], r["n"]) for r in table.to_pylist()}


def evidence_weights(snapshot: pa.Table, scheme: WeightScheme) -> dict[str, float]:
    w = compute_weights(snapshot["evidence_correct"].to_numpy(), snapshot["evidence_n"].to_numpy(), scheme)
    keep = w > 0
    return dict(zip(np.asarray(snapshot["problem_id"].to_pylist())[keep].tolist(), w[keep] / w[keep].mean(),
                    strict=True))


def test_an_old_snapshot_without_evidence_reads_and_weighs_as_before(tmp_path, capsys):
    home, base = make_service_home(tmp_path, n=18)
    path = home.snapshots_dir("s1") / f"{base}.parquet"
    assert pq.read_schema(path) == COUNTS_SCHEMA  # as snapshots were written before carry-over
    table = read_snapshot(home, "s1", base)
    assert table.schema == SNAPSHOT_SCHEMA
    assert table["evidence_n"].to_pylist() == [float(n) for n in table["n"].to_pylist()]
    assert table["evidence_correct"].to_pylist() == [float(c) for c in table["correct"].to_pylist()]
    assert set(table["carried_share"].to_pylist()) == {0.0}
    out = tmp_path / "m"
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(out),
                 "--no-require-reference", "--home", str(home.root)]) == 0
    w = compute_weights(table["correct"].to_numpy(), table["n"].to_numpy(), WeightScheme(name="paced"))
    keep = w > 0
    want = dict(zip(np.asarray(table["problem_id"].to_pylist())[keep].tolist(), w[keep] / w[keep].mean(),
                    strict=True))
    assert_same_weights(manifest_weights(out), want)
    capsys.readouterr()
    assert main(["passrates", "show", "--student", "s1", "--json", "--home", str(home.root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["carried_rows"], shown["carried_share"], shown["evidence_samples"]) == (0, 0.0, 18 * 8.0)


def test_evidence_accumulates_as_old_times_decay_plus_fresh_across_two_refreshes(tmp_path, capsys):
    home, base = make_service_home(tmp_path, n=12)
    lam = 0.8
    first_ids, second_ids = ["p0000001", "p0000004", "p0000009"], ["p0000004", "p0000005"]
    fake_rollouts(home, A, first_ids, k=4)
    first = refresh_lineage(home, "s1", A, "arith", "h2", base, problem_ids=first_ids, step=5, decay=lam)
    assert refresh_lineage(home, "s1", A, "arith", "h2", base, problem_ids=first_ids, step=5,
                           decay=lam) == first
    assert pq.read_schema(home.snapshots_dir("s1") / f"{first}.parquet") == SNAPSHOT_SCHEMA
    fake_rollouts(home, B, second_ids, k=4)
    second = refresh_lineage(home, "s1", B, "arith", "h2", first, problem_ids=second_ids, step=9, decay=lam)
    old, one, two = rows_of(home, "s1", base), rows_of(home, "s1", first), rows_of(home, "s1", second)
    fa, fb = fresh_counts(home, A, 4), fresh_counts(home, B, 4)
    for pid in old:
        o = old[pid]
        # After the first refresh: λ × the base counts + A's fresh counts; the rest carried as they were.
        c1, n1 = (o["correct"], o["n"])
        if pid in fa:
            c1, n1 = lam * o["correct"] + fa[pid][0], lam * o["n"] + fa[pid][1]
        # After the second: λ × the first evidence + B's fresh counts.
        c2, n2 = (lam * c1 + fb[pid][0], lam * n1 + fb[pid][1]) if pid in fb else (c1, n1)
        for row, c, n, fresh, counts in ((one[pid], c1, n1, pid in fa, fa),
                                         (two[pid], c2, n2, pid in fb, fb)):
            assert row["evidence_correct"] == pytest.approx(c) and row["evidence_n"] == pytest.approx(n)
            assert row["pass_rate"] == pytest.approx(c / n)
            if fresh:  # the integer counts stay the fresh samples'; the carried share is what λ kept
                assert (row["correct"], row["n"], row["stale_age"]) == (*counts[pid], 0)
                assert row["carried_share"] == pytest.approx((n - 4) / n)
            else:
                assert row["carried_share"] == 1.0 and row["stale_age"] > 0
    assert two["p0000004"]["evidence_n"] == pytest.approx(lam * (lam * 8 + 4) + 4)
    record = read_lineage(home, "s1", second)
    assert record["carry_over_decay"] == lam
    row_shares = [r["carried_share"] for r in two.values()]
    assert record["carried_share"]["mean"] == pytest.approx(np.mean(row_shares))
    # A kill between the side file and the snapshot: the rerun writes the same rows under the same id.
    path = home.snapshots_dir("s1") / f"{second}.parquet"
    before = read_snapshot(home, "s1", second)
    path.unlink()
    assert refresh_lineage(home, "s1", B, "arith", "h2", first, problem_ids=second_ids, step=9,
                           decay=lam) == second
    assert read_snapshot(home, "s1", second).equals(before)
    # Without carry-over the same inputs are another refresh (its key differs).
    plain = refresh_lineage(home, "s1", B, "arith", "h2", first, problem_ids=second_ids, step=9)
    assert plain != second and rows_of(home, "s1", plain)["p0000005"]["evidence_n"] == 4.0
    # Manifests and the service weigh by the evidence, not by the fresh counts alone.
    snapshot = read_snapshot(home, "s1", second)
    for scheme in ("paced", "paced-posterior"):
        out = tmp_path / f"m-{scheme}"
        assert main(["manifest", "build", "--student", "s1", "--snapshot", second, "--dataset", "arith",
                     "--out",
                     str(out), "--no-require-reference", "--scheme", scheme, "--home", str(home.root)]) == 0
        assert_same_weights(manifest_weights(out), evidence_weights(snapshot, WeightScheme(name=scheme)))
    counts_only = compute_weights(snapshot["correct"].to_numpy(), snapshot["n"].to_numpy(),
                                  WeightScheme(name="paced"))
    assert not np.allclose(counts_only, compute_weights(snapshot["evidence_correct"].to_numpy(),
                                                        snapshot["evidence_n"].to_numpy(),
                                                        WeightScheme(name="paced")))
    app = create_app(Settings(home=home.root, max_shard_size=64))
    with TestClient(app) as client:
        run = client.post("/v1/runs", json={"student_id": "s1", "dataset": "arith", "shard_size": 64,
                                            "snapshot_id": second, "scheme": "paced"})
        assert run.status_code == 201, run.text
        shard = client.get(f"/v1/runs/{run.json()['run_id']}/epochs/0/shards/0").json()
        page = client.get("/").text  # the dashboard's lineage table, newest snapshot first
    shares = [np.mean(read_snapshot(home, "s1", sid)["carried_share"].to_numpy())
              for sid in list_snapshots(home, "s1")]
    shown = re.findall(r"data-field='carried_share'>([^<]+)<", page)
    assert shown == [f"{100 * x:.1f}%" for x in reversed(shares)]
    assert shares[0] == 0 and shares[2] > 0
    served = {it["problem_id"]: it["weight"] for it in shard["items"]}
    assert_same_weights(served, evidence_weights(snapshot, WeightScheme(name="paced")))
    capsys.readouterr()
    assert main(["passrates", "show", "--student", "s1", "--snapshot", second, "--json", "--home",
                 str(home.root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["carried_share"] == pytest.approx(record["carried_share"]["mean"])
    assert shown["carried_rows"] == sum(r["stale_age"] > 0 for r in two.values())


def test_train_with_carry_over_rolls_out_the_chosen_problems_and_weighs_by_the_evidence(models, tmp_path,
                                                                                        capsys):
    home, base, manifest = home_with_manifest(tmp_path, capsys)
    out = tmp_path / "out"
    args = train_args(models, manifest, out, "--steps", "5", "--refresh-every", "2", "--home", str(home.root),
                      "--carry-over-decay", "0.5", "--fresh-samples", "2", "--reprobe-fraction", "0.3",
                      "--rollout-max-new-tokens", "3")
    assert main(args) == 0
    refreshes = summary_of(capsys)["refreshes"]
    assert [r["step"] for r in refreshes] == [2, 4] and all(r["carry_over_decay"] == 0.5 for r in refreshes)
    previous = read_snapshot(home, "s1", base)
    for r in refreshes:
        snapshot = read_snapshot(home, "s1", r["snapshot_id"])
        ids = previous["problem_id"].to_pylist()
        chosen = select_fresh(ids, previous["evidence_correct"].to_numpy(), previous["evidence_n"].to_numpy(),
                              previous["stale_age"].to_numpy(), 0.3, 0, r["round"])
        chosen_ids = sorted(np.asarray(ids)[chosen].tolist())
        counts = {row["problem_id"]: (row["correct"], row["n"]) for row in pass_counts(
            batch_files(home.rollouts_dir(r["checkpoint_id"], r["sampling_hash"], "arith")), 2).to_pylist()}
        assert sorted(counts) == chosen_ids and r["rollout_samples"] == 2 * len(chosen_ids)
        before = {row["problem_id"]: row for row in previous.to_pylist()}
        for row in snapshot.to_pylist():
            old = before[row["problem_id"]]
            if row["problem_id"] in counts:
                c, n = counts[row["problem_id"]]
                assert row["evidence_n"] == pytest.approx(0.5 * old["evidence_n"] + n)
                assert row["evidence_correct"] == pytest.approx(0.5 * old["evidence_correct"] + c)
            else:
                assert (row["evidence_n"], row["carried_share"]) == (old["evidence_n"], 1.0)
        assert_same_weights(manifest_weights(out / f"manifest-step{r['step']}"),
                            evidence_weights(snapshot, WeightScheme(name="paced-posterior")))
        previous = snapshot
    # Off without --refresh-every; --fresh-samples needs --carry-over-decay.
    assert main(train_args(models, manifest, tmp_path / "o2", "--carry-over-decay", "0.5")) == 1
    assert "--refresh-every" in capsys.readouterr().err
    assert main(train_args(models, manifest, tmp_path / "o3", "--refresh-every", "2", "--fresh-samples",
                           "2")) == 1
    assert "--carry-over-decay" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter, two training runs
def test_kill_during_a_carry_over_refresh_then_resume_gives_the_same_snapshots(models, tmp_path, capsys):
    runs = {name: home_with_manifest(tmp_path / name, capsys, 40) for name in ("a", "b")}
    extra = ["--steps", "4", "--refresh-every", "2", "--carry-over-decay", "0.8", "--fresh-samples", "3",
             "--rollout-batch-size", "1", "--rollout-max-new-tokens", "8"]

    def args(name, *more):
        home, _, manifest = runs[name]
        return train_args(models, manifest, tmp_path / name / "out", *extra, "--home", str(home.root), *more)

    home_b = runs["b"][0]
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", *args("b")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = tmp_path / "b" / "out" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if state.exists() and list((home_b.root / "rollouts").glob("m-*/*/arith/batch-*.parquet")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(state.read_text())["pending_refresh"]["step"] == 2
    rolled = list((home_b.root / "rollouts").glob("m-*/*/arith/batch-*.parquet"))
    assert rolled, "the kill came before the rollout"
    assert len(list_snapshots(home_b, "s1")) == 1, "the kill came after the refresh's snapshot"
    assert main(args("b", "--resume")) == 0
    resumed = summary_of(capsys)
    assert main(args("a")) == 0
    full = summary_of(capsys)
    columns = ["problem_id", "student_id", "n", "correct", "stale_age", "evidence_n", "evidence_correct",
               "carried_share", "pass_rate"]
    for r_b, r_a in zip(resumed["refreshes"], full["refreshes"], strict=True):
        got = read_snapshot(home_b, "s1", r_b["snapshot_id"]).select(columns)
        want = read_snapshot(runs["a"][0], "s1", r_a["snapshot_id"]).select(columns)
        assert got.equals(want) and r_b["rollout_samples"] == r_a["rollout_samples"]
    a, b = parameters(tmp_path / "a" / "out" / "final"), parameters(tmp_path / "b" / "out" / "final")
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)
