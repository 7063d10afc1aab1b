"""Sharded rollouts: a stable partition, shards running at once on one home, one SIGKILLed and
resumed, and the union equal to the single-process rollouts (then merged by `paced refresh`)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from test_rollout import CONFIG, ENV, cli, make_home, rows_of

from paced.cli import main
from paced.errors import ConflictError, InputError
from paced.jobs.rollout import rollout
from paced.store.home import open_home
from paced.store.partition import Shard, parse_shard, resolve_shard, shard_of
from paced.store.problems import read_problems
from paced.store.rollouts import batch_files, folder_lock, next_seq
from paced.store.snapshots import read_snapshot


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from paced.backends.hf_backend import HFBackend

    with HFBackend(tiny_model_dir, batch_size=64) as backend:
        yield backend


def test_partition_is_stable_disjoint_and_covers_the_pool():
    ids = [f"p{i:05d}" for i in range(2000)]
    owners = [[pid for pid in ids if Shard(r, 4).owns(pid)] for r in range(4)]
    assert sorted(sum(owners, [])) == ids  # disjoint and complete
    assert all(400 < len(o) < 600 for o in owners)  # roughly even
    assert shard_of("p00042", 4) == shard_of("p00042", 4) and Shard().owns("anything")
    # pinned: sha256 of the id, never Python's per-process hash(); a change here re-shards every home
    assert [shard_of(p, 7) for p in ("p1", "p2", "p3", "p4")] == [2, 5, 1, 0]


def test_shard_comes_from_the_flag_then_slurm_then_rank_and_bad_values_are_one_line_errors():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
           "RANK": "1", "WORLD_SIZE": "2"}
    assert resolve_shard("2/8", env) == Shard(2, 8)
    assert resolve_shard(None, env) == Shard(1, 3)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert resolve_shard(None, {}) == Shard() and Shard().tag == ""
    assert Shard(3, 16).tag == "-s00003of00016"
    for bad in ("3", "4/4", "-1/2", "a/b", "1/0"):
        with pytest.raises(InputError, match="RANK"):
            parse_shard(bad)
    with pytest.raises(InputError, match="WORLD_SIZE must be an integer"):
        resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "two"})


def test_shards_share_the_folder_but_exclude_a_whole_pool_job_and_their_own_copy(tmp_path):
    with folder_lock(tmp_path, "rollout", Shard(0, 2)), folder_lock(tmp_path, "rollout", Shard(1, 2)):
        with pytest.raises(ConflictError, match="shard 0/2"):
            with folder_lock(tmp_path, "rollout", Shard(0, 2)):
                pass
        with pytest.raises(ConflictError, match="another rollout"):
            with folder_lock(tmp_path, "rollout"):
                pass
    (tmp_path / "batch-00000000.parquet").touch()
    (tmp_path / "batch-00000004-s00001of00002.parquet").touch()
    assert (next_seq(tmp_path), next_seq(tmp_path, Shard(1, 2)), next_seq(tmp_path, Shard(0, 2))) == (1, 5, 0)
    other = tmp_path / ".tmp-batch-00000005-s00001of00002.parquet.abc"
    other.touch()
    with folder_lock(tmp_path, "rollout", Shard(0, 2)):
        assert other.exists()  # another shard's write in flight is left alone
    with folder_lock(tmp_path, "rollout", Shard(1, 2)):
        assert not other.exists()  # its own leftover is swept


@pytest.mark.slow
def test_concurrent_shards_one_killed_and_resumed_equal_the_single_process_rollout(tmp_path, tiny_model_dir,
                                                                                    hf_backend):
    student_dir = tiny_model_dir
    n = 40
    sharded, whole = make_home(tmp_path / "sharded", n=n), make_home(tmp_path / "whole", n=n)
    folder = open_home(sharded).rollouts_dir("s1", CONFIG.sampling_hash, "arith")
    procs = [subprocess.Popen(cli(sharded, student_dir, "--batch-size", "2", "--shard", f"{r}/2"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    deadline = time.monotonic() + 240
    while not list(folder.glob("batch-*-s00000of00002.parquet")) and procs[0].poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    out, err = procs[1].communicate(timeout=300)
    assert procs[1].returncode == 0, err[-2000:]
    assert json.loads(out)["shard"] == "1/2"
    killed_batches = len(list(folder.glob("batch-*-s00000of00002.parquet")))
    mine = sum(Shard(0, 2).owns(pid) for pid in read_problems(open_home(sharded), "arith")["id"].to_pylist())
    assert 1 <= killed_batches < -(-mine // 2), f"the kill landed after {killed_batches} batches"
    resumed = subprocess.run(cli(sharded, student_dir, "--batch-size", "2", "--shard", "0/2"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (json.loads(resumed.stdout)["rolled_out"]
            == json.loads(resumed.stdout)["problems"] - 2 * killed_batches)
    rollout(open_home(whole), None, "arith", CONFIG, student_id="s1", backend=hf_backend, progress=False)
    a, b = rows_of(sharded, "s1"), rows_of(whole, "s1")
    assert a.num_rows == 2 * n and a.equals(b)  # the same samples: none lost, none doubled
    names = [p.name for p in batch_files(folder)]
    assert all("-s0000" in name for name in names) and not list(folder.glob(".tmp-*"))
    for home in (sharded, whole):
        assert main(["refresh", "--home", str(home)]) == 0
    merged, single = (read_snapshot(open_home(h), "s1") for h in (sharded, whole))
    cols = ["problem_id", "n", "correct", "pass_rate"]
    assert merged.select(cols).equals(single.select(cols)) and merged.num_rows == n
