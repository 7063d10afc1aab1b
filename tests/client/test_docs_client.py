"""docs/client.md runs: every code block of the page, read from the Markdown (so the page and the
tests cannot drift), against a tiny model, a shard folder and a run of the real service."""

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from api_fixtures import ServerThread, make_service_home

from paced.api.app import create_app
from paced.api.settings import Settings
from paced.cli import main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def blocks(language: str) -> list[str]:
    """The page's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", PAGE.read_text(), flags=re.S | re.M)


@pytest.fixture
def world(tmp_path, tiny_model_dir, capsys):
    """MODEL, TEACHER, SHARDS, OUT and a function making a fresh RUN_URL on a live service."""
    home, _ = make_service_home(tmp_path, n=40)
    shards = tmp_path / "shards"
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(shards),
                 "--shard-size", "8", "--home", str(home.root)]) == 0
    capsys.readouterr()
    with ServerThread(create_app(Settings(home=home.root, retry_after_seconds=0.1))) as server:
        def new_run() -> str:
            body = {"student_id": "s1", "dataset": "arith", "shard_size": 5}
            return f"{server.url}/v1/runs/{httpx.post(f'{server.url}/v1/runs', json=body).json()['run_id']}"

        yield {"MODEL": str(tiny_model_dir), "TEACHER": str(tiny_model_dir), "SHARDS": str(shards),
               "OUT": str(tmp_path / "out"), "new_run": new_run, "home": home}


def run_python(code: str, world: dict, run_url: str | None = None) -> dict:
    scope = {k: world[k] for k in ("MODEL", "TEACHER", "SHARDS", "OUT")}
    scope["RUN_URL"] = run_url
    exec(compile(code, str(PAGE), "exec"), scope)
    return scope


def test_the_page_has_the_blocks_this_test_runs():
    assert len(blocks("sh")) == 1 and len(blocks("python")) == 3


@pytest.mark.slow  # two `paced train` processes
def test_paced_train_block_runs(world, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "paced").write_text(f'#!/bin/sh\nexec {sys.executable} -m paced.cli "$@"\n')
    (bin_dir / "paced").chmod(0o755)
    run = world["new_run"]()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_URL": run,
           "PYTHONPATH": str(PAGE.parents[1]), **{k: world[k] for k in ("MODEL", "TEACHER", "SHARDS", "OUT")}}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks("sh")[0]], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for where in ("files", "http"):
        assert (Path(world["OUT"]) / where / "final" / "config.json").is_file()
    assert httpx.get(run).json()["progress"][0]["acked"] >= 1


def test_trl_from_shard_files_block_runs(world):
    scope = run_python(blocks("python")[0], world)
    assert scope["trainer"].state.global_step == 2 and "weight" in scope["rows"].column_names


def test_trl_over_http_block_runs_the_whole_run_and_acks_every_shard(world):
    run = world["new_run"]()
    scope = run_python(blocks("python")[1], world, run)
    view, client = httpx.get(run).json(), scope["client"]
    assert view["done"] and client.acked == client.leased == view["progress"][0]["shards"]


def test_own_loop_over_http_block_runs_the_whole_run_and_acks_every_shard(world):
    run = world["new_run"]()
    scope = run_python(blocks("python")[2], world, run)
    view, client = httpx.get(run).json(), scope["client"]
    assert view["done"] and client.acked == client.leased == view["progress"][0]["shards"]
    assert client.conflicts == 0 and scope["loss"].item() > 0
