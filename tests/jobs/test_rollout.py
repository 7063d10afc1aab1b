"""`paced rollout`: resumable after SIGKILL, K raised rolls out only the difference, new problems
only, nothing pending does nothing (no engine), per-sample seeds, both backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from paced.cli import main
from paced.jobs.rollout import RolloutConfig, chunk_batches, missing_runs, pending_work, rollout
from paced.store.home import open_home
from paced.store.problems import read_problems
from paced.store.rollouts import batch_files, read_rollouts, read_sampling_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONFIG = RolloutConfig(k=2, max_new_tokens=6, batch_size=4, grader_workers=1)


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def hf_backend(student_dir):
    from paced.backends.hf_backend import HFBackend

    with HFBackend(student_dir, batch_size=64) as backend:
        yield backend


def make_home(root: Path, n: int = 12, seed: int = 0) -> Path:
    home = root / "home"
    assert main(["import", "builtin:arithmetic", "--n", str(n), "--seed", str(seed), "--dataset", "arith",
                 "--home", str(home)]) == 0
    return home


def rows_of(home_dir: Path, student_id: str, config: RolloutConfig = CONFIG, dataset: str = "arith"):
    home = open_home(home_dir)
    return read_rollouts(batch_files(home.rollouts_dir(student_id, config.sampling_hash, dataset)))


def cli(home: Path, student: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "paced.cli", "rollout", "--student", str(student), "--student-id", "s1",
            "--dataset", "arith", "-k", "2", "--max-new-tokens", "6", "--backend", "transformers",
            "--grader-workers", "1", "--home", str(home), *extra]


def test_pending_work_splits_missing_samples_into_runs_and_batches_by_problem():
    assert missing_runs([], 3) == [(0, 3)]
    assert missing_runs([0, 1], 4) == [(2, 2)]
    assert missing_runs([1, 3], 5) == [(0, 1), (2, 1), (4, 1)]
    assert missing_runs([0, 1, 2], 3) == []
    import pyarrow as pa

    problems = pa.table({"id": ["a", "b", "c"], "prompt": ["1", "2", "3"], "answer": ["1", "2", "3"]})
    items = pending_work(problems, {"a": [0, 1], "b": [1]}, 2)
    assert [(i.problem_id, i.first, i.count) for i in items] == [("b", 0, 1), ("c", 0, 2)]
    many = pending_work(problems, {"b": [1]}, 3)
    batches = chunk_batches(many, 2)
    assert [[(i.problem_id, i.first) for i in b] for b in batches] == [[("a", 0), ("b", 0), ("b", 2)],
                                                                       [("c", 0)]]


def test_rollout_writes_graded_rows_and_sampling_json(tmp_path, student_dir, hf_backend):
    home_dir = make_home(tmp_path)
    summary = rollout(open_home(home_dir), student_dir, "arith", CONFIG, backend=hf_backend, progress=False)
    from paced.backends.base import model_id

    assert summary["student_id"] == model_id(student_dir)
    assert (summary["problems"], summary["rolled_out"], summary["samples"], summary["batches"]) == (12, 12,
                                                                                                    24, 3)
    assert summary["pass_rates"]["problems"] == 12 and summary["pass_rates"]["rollouts"] == 24
    table = rows_of(home_dir, summary["student_id"])
    assert table.num_rows == 24 and sum(table["tokens"].to_pylist()) == summary["tokens"]
    assert set(table["outcome"].to_pylist()) <= {"correct", "wrong", "unparseable"}
    assert set(table["grader"].to_pylist()) == {"numeric@1"}
    assert set(table["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert all(len(t) <= 6 for t in table["completion"].to_pylist())
    folder = open_home(home_dir).rollouts_dir(summary["student_id"], CONFIG.sampling_hash, "arith")
    recorded = read_sampling_config(folder)
    assert recorded["sampling_hash"] == CONFIG.sampling_hash and recorded["temperature"] == 1.0
    assert "n" not in recorded and recorded["max_new_tokens"] == 6


def test_raising_k_rolls_out_only_the_missing_samples_and_equals_a_direct_run(tmp_path, student_dir,
                                                                              hf_backend):
    a, b = make_home(tmp_path / "a"), make_home(tmp_path / "b")
    rollout(open_home(a), None, "arith", CONFIG, student_id="s1", backend=hf_backend, progress=False)
    raised = RolloutConfig(k=4, max_new_tokens=6, batch_size=4, grader_workers=1)
    assert raised.sampling_hash == CONFIG.sampling_hash  # K is not part of the sampling hash
    more = rollout(open_home(a), None, "arith", raised, student_id="s1", backend=hf_backend, progress=False)
    assert (more["rolled_out"], more["samples"]) == (12, 24)
    direct = rollout(open_home(b), None, "arith", raised, student_id="s1", backend=hf_backend, progress=False)
    assert direct["samples"] == 48
    ta, tb = rows_of(a, "s1"), rows_of(b, "s1")
    assert ta.equals(tb)  # samples 0..1 are the same draws whether K was 2 or 4
    assert sorted(set(ta["sample_idx"].to_pylist())) == [0, 1, 2, 3]
    late = ta.filter(pc.greater_equal(ta["sample_idx"], 2))
    assert late.num_rows == 24


def test_new_problems_only_roll_out_the_new_ones_and_done_is_a_no_op(tmp_path, student_dir, hf_backend):
    home_dir = make_home(tmp_path, n=8)
    home = open_home(home_dir)
    rollout(home, None, "arith", CONFIG, student_id="s1", backend=hf_backend, progress=False)
    before = {p.name: p.read_bytes()
              for p in batch_files(home.rollouts_dir("s1", CONFIG.sampling_hash, "arith"))}
    make_home(tmp_path, n=12)  # same generator, 4 more problems
    assert read_problems(home, "arith").num_rows == 12
    more = rollout(home, None, "arith", CONFIG, student_id="s1", backend=hf_backend, progress=False)
    assert (more["rolled_out"], more["samples"], more["pass_rates"]["problems"]) == (4, 8, 12)
    after = {p.name: p.read_bytes()
             for p in batch_files(home.rollouts_dir("s1", CONFIG.sampling_hash, "arith"))}
    assert {k: after[k] for k in before} == before  # committed batches never change
    again = rollout(home, None, "arith", CONFIG, student_id="s1", backend=None,
                    backend_name="no-such-backend",
                    progress=False)  # nothing pending: the backend is never loaded
    assert again["already_done"] and again["samples"] == 0 and again["pass_rates"]["rollouts"] == 24


def test_subset_and_round_roll_out_fresh_samples_of_only_those_problems(tmp_path, hf_backend):
    home = open_home(make_home(tmp_path))
    ids = read_problems(home, "arith")["id"].to_pylist()[:3]
    base = rollout(home, None, "arith", CONFIG, student_id="s1", problem_ids=ids, backend=hf_backend,
                   progress=False)
    round1 = RolloutConfig(**{**CONFIG.__dict__, "round": 1})
    again = rollout(home, None, "arith", round1, student_id="s1", problem_ids=ids, backend=hf_backend,
                    progress=False)
    assert base["problems"] == again["problems"] == again["rolled_out"] == 3
    assert round1.sampling_hash != CONFIG.sampling_hash
    t0, t1 = rows_of(home.root, "s1"), rows_of(home.root, "s1", round1)
    assert set(t0["problem_id"].to_pylist()) == set(t1["problem_id"].to_pylist()) == set(ids)
    assert t0["completion"].to_pylist() != t1["completion"].to_pylist()
    with pytest.raises(Exception, match="not in data set"):
        rollout(home, None, "arith", CONFIG, student_id="s1", problem_ids=["nope"], backend=hf_backend,
                progress=False)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, student_dir):
    n = 48  # 12 batches of 4
    killed, clean = make_home(tmp_path / "killed", n=n), make_home(tmp_path / "clean", n=n)
    folder = open_home(killed).rollouts_dir("s1", CONFIG.sampling_hash, "arith")
    proc = subprocess.Popen(cli(killed, student_dir, "--batch-size", "4"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not batch_files(folder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(batch_files(folder))
    assert 1 <= committed < 12, f"kill landed after {committed} of 12 batches"
    resumed = subprocess.run(cli(killed, student_dir, "--batch-size", "4"), env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["rolled_out"] == n - 4 * committed and summary["pass_rates"]["rollouts"] == 2 * n
    assert main(cli(clean, student_dir, "--batch-size", "4")[3:]) == 0  # uninterrupted, in this process
    a, b = rows_of(killed, "s1"), rows_of(clean, "s1")
    assert a.num_rows == 2 * n and a.equals(b)
    keys = list(zip(a["problem_id"].to_pylist(), a["sample_idx"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    assert [p.name for p in batch_files(folder)] == [f"batch-{i:08d}.parquet" for i in range(12)]
    assert not list(folder.glob(".tmp-*"))


def test_rerun_when_done_starts_no_engine_and_says_so(tmp_path, student_dir, hf_backend):
    home_dir = make_home(tmp_path, n=4)
    rollout(open_home(home_dir), None, "arith", CONFIG, student_id="s1", backend=hf_backend, progress=False)
    code = ("import sys; from paced.cli import main; rc = main(sys.argv[1:]); "
            "sys.stderr.write(f'HEAVY={sorted(m for m in (\"torch\", \"vllm\", \"transformers\") if m in "
            "sys.modules)}'); sys.exit(rc)")
    args = cli(home_dir, tmp_path / "no-model-here")[3:]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["already_done"] is True
    assert "nothing to do" in proc.stderr and "HEAVY=[]" in proc.stderr
    assert time.monotonic() - start < 30


def test_bad_arguments_are_one_line_errors(tmp_path, student_dir):
    home_dir = make_home(tmp_path, n=2)
    for extra in (["-k", "0"], ["--top-p", "0"], ["--limit", "0"]):
        assert main(cli(home_dir, student_dir, *extra)[3:]) == 1
    assert main(["rollout", "--student", str(student_dir), "--dataset", "nope", "--home", str(home_dir)]) == 1


@pytest.mark.vllm
def test_vllm_rollout_is_resumable_and_raising_k_equals_a_direct_run(tmp_path, vllm_backend):
    a, b = make_home(tmp_path / "a", n=10), make_home(tmp_path / "b", n=10)
    small = RolloutConfig(k=2, max_new_tokens=6, batch_size=3, grader_workers=1)
    first = rollout(open_home(a), None, "arith", small, student_id="v", backend=vllm_backend, progress=False)
    assert (first["samples"], first["batches"]) == (20, 4)
    raised = RolloutConfig(k=4, max_new_tokens=6, batch_size=3, grader_workers=1)
    more = rollout(open_home(a), None, "arith", raised, student_id="v", backend=vllm_backend, progress=False)
    assert (more["rolled_out"], more["samples"]) == (10, 20)
    rollout(open_home(b), None, "arith", raised, student_id="v", backend=vllm_backend, progress=False)
    ta, tb = rows_of(a, "v", raised), rows_of(b, "v", raised)
    assert ta.num_rows == 40 and ta.equals(tb)
    assert set(ta["outcome"].to_pylist()) <= {"correct", "wrong", "unparseable"}
    done = rollout(open_home(a), None, "arith", raised, student_id="v", backend=vllm_backend, progress=False)
    assert done["already_done"] and done["pass_rates"]["rollouts"] == 40


def test_rollouts_feed_refresh_passrates_and_a_manifest(tmp_path, hf_backend, capsys):
    home_dir = make_home(tmp_path)
    summary = rollout(open_home(home_dir), None, "arith", CONFIG, student_id="s1", backend=hf_backend,
                      progress=False)
    capsys.readouterr()
    assert main(["refresh", "--home", str(home_dir)]) == 0
    refreshed = json.loads(capsys.readouterr().out)
    assert (refreshed["student_id"], refreshed["sampling_hash"],
            refreshed["rollouts"]) == ("s1", CONFIG.sampling_hash, 24)
    assert main(["passrates", "show", "--student", "s1", "--json", "--home", str(home_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["snapshot_id"] == refreshed["snapshot_id"]
    assert {k: shown[k] for k in summary["pass_rates"]} == summary["pass_rates"]
    out = tmp_path / "manifest"
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--scheme", "uniform",
                 "--no-require-reference", "--out", str(out), "--home", str(home_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 12
