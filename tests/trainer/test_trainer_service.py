"""`paced train` against a real `paced serve` subprocess, and the refresh between stages."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest
from api_fixtures import make_service_home, wait_until_healthy
from trainer_helpers import summary_of, train_args

from paced.cli import main

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def service(tmp_path):
    """A data home with 60 problems (references for even ones) and `paced serve` on it."""
    home, _ = make_service_home(tmp_path, n=60)
    port = free_port()
    env = {**os.environ, "PACED_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", "serve", "--home", str(home.root), "--port",
                             str(port), "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url)
    yield url, home
    proc.terminate()
    proc.wait(timeout=30)


def create_run(url: str, **config) -> dict:
    body = {"student_id": "s1", "dataset": "arith", "shard_size": 6, **config}
    r = httpx.post(f"{url}/v1/runs", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def test_training_from_the_service_acks_every_leased_shard_once(models, service, tmp_path, capsys,
                                                                monkeypatch):
    url, _ = service
    run = create_run(url)
    monkeypatch.setenv("PACED_TOKEN", TOKEN)
    args = train_args(models, f"{url}/v1/runs/{run['run_id']}", tmp_path / "out", "--steps", "1000",
                      "--lease-ttl-seconds", "120")
    assert main(args) == 0
    summary = summary_of(capsys)
    # Every shard was leased once and acked once; training stopped when the run was done.
    assert summary["data_exhausted"] and summary["steps"] > 0
    assert summary["shards_leased"] == summary["shards_acked"] == run["shards"]
    assert summary["ack_conflicts"] == 0 and summary["skipped_rows_without_completion"] > 0
    view = httpx.get(f"{url}/v1/runs/{run['run_id']}", timeout=30).json()
    assert view["done"] and sum(p["acked"] for p in view["progress"]) == run["shards"]


def test_the_service_refuses_a_missing_token_with_a_clear_error(models, service, tmp_path, capsys,
                                                                monkeypatch):
    url, _ = service
    run = create_run(url)
    monkeypatch.delenv("PACED_TOKEN", raising=False)
    assert main(train_args(models, f"{url}/v1/runs/{run['run_id']}", tmp_path / "out", "--steps", "1")) == 1
    err = capsys.readouterr().err
    assert "401" in err and "--token" in err and "Traceback" not in err
    assert main(train_args(models, f"{url}/v1/runs/r-000000000000", tmp_path / "out2", "--steps", "1",
                           "--token", TOKEN)) == 1
    assert "404" in capsys.readouterr().err


def test_refresh_between_stages_reweights_stage_two_by_the_new_students_pass_rates(models, tmp_path, capsys):
    home, _ = make_service_home(tmp_path, n=40)
    manifest = tmp_path / "m"
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(manifest),
                 "--no-require-reference",
                 "--shard-size", "8", "--scheme", "paced-posterior", "--home", str(home.root)]) == 0
    capsys.readouterr()
    args = train_args(models, manifest, tmp_path / "out", "--stages", "forward:2,forward:1",
                      "--refresh-between-stages", "--home", str(home.root), "--rollout-k", "2",
                      "--max-new-tokens", "3", "--weight-decay", "0")
    assert main(args) == 0
    summary = summary_of(capsys)
    (refresh,) = summary["refreshes"]
    assert refresh["after_stage"] == 0 and refresh["step"] == 2 and refresh["rollout_samples"] == 2 * 40
    assert summary["source"] == refresh["source"] == str(tmp_path / "out" / "manifest-stage1")
    built = json.loads((tmp_path / "out" / "manifest-stage1" / "manifest.json").read_text())
    assert built["inputs"]["student_id"] == refresh["student_id"] != "s1"
    assert built["inputs"]["snapshot_id"] == refresh["snapshot_id"]
    assert [s["steps_done"] for s in summary["stages"]] == [2, 1]
    # The new manifest's weights come from the stage-1 student's pass rates (K = 2: p in {0, 1/2, 1}).
    rates = {r for f in sorted((tmp_path / "out" / "manifest-stage1").glob("shard-*.parquet"))
             for r in pq.read_table(f)["pass_rate"].to_pylist()}
    assert rates <= {0.0, 0.5, 1.0}
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stage"] == 1 and state["source"] == refresh["source"]  # a resume skips the refresh


def test_refresh_between_stages_over_http_continues_from_a_new_run(models, service, tmp_path, capsys,
                                                                   monkeypatch):
    url, home = service
    run = create_run(url, scheme="paced-posterior")
    monkeypatch.setenv("PACED_TOKEN", TOKEN)
    args = train_args(models, f"{url}/v1/runs/{run['run_id']}", tmp_path / "out", "--stages",
                      "forward:1,forward:1", "--refresh-between-stages", "--home", str(home.root),
                      "--rollout-k", "2", "--max-new-tokens", "3")
    assert main(args) == 0
    summary = summary_of(capsys)
    (refresh,) = summary["refreshes"]
    new_run = refresh["source"].rsplit("/", 1)[-1]
    assert new_run != run["run_id"] and summary["source"] == f"{url}/v1/runs/{new_run}"
    view = httpx.get(f"{url}/v1/runs/{new_run}", timeout=30).json()
    assert view["config"]["student_id"] == refresh["student_id"]
    assert view["config"]["scheme"] == "paced-posterior"
    assert view["snapshot_id"] == refresh["snapshot_id"]
    assert [s["steps_done"] for s in summary["stages"]] == [1, 1]
