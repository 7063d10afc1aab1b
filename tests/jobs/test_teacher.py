"""`paced teacher`: only verified-correct references, greedy first then sampled tries, unsolved
problems recorded (and not retried), resumable.

The "teacher" is the tiny random model; the problems are built so that it can solve some of
them honestly: their answers are what it generates greedily (solved at try 0) or what its first
sampled try draws under the job's seeds (solved at try 1), and others have answers it cannot
write at all (letters are outside its vocabulary).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pyarrow.parquet as pq
import pytest

from paced.cli import main
from paced.grading import verify
from paced.jobs.rollout import sample_seed
from paced.jobs.teacher import TeacherConfig, collect_references
from paced.store.home import open_home
from paced.store.rollouts import batch_files, done_problems
from paced.store.shards import REFERENCE_SCHEMA, reference_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG = TeacherConfig(tries=3, k=2, max_new_tokens=6, batch_size=5, grader_workers=1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from paced.backends.hf_backend import HFBackend
    from paced.tasks.models import build_random_model

    model = build_random_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)
    with HFBackend(model, batch_size=64) as backend:
        yield model, backend


@pytest.fixture(scope="module")
def problems_file(teacher, tmp_path_factory) -> tuple[str, dict]:
    """A JSONL data set (exact grader) and the attempt each problem is expected to be solved at."""
    backend = teacher[1]
    prompts = [f"{a}+{b}=" for a in range(1, 9) for b in (3, 57)]
    ids = [f"p{i:02d}" for i in range(len(prompts))]
    greedy = backend.generate(prompts, CONFIG.sampling(0))
    sampled = backend.generate(prompts, CONFIG.sampling(1),
                               seeds=[sample_seed(CONFIG.seed, pid, 0) for pid in ids])
    rows, expect = [], {}
    for i, (pid, prompt, [g], [s]) in enumerate(zip(ids, prompts, greedy, sampled, strict=True)):
        if i % 3 == 0 and g.text.strip():
            answer, expect[pid] = g.text, 0
        elif i % 3 == 1 and s.text.strip() and s.text.strip() != g.text.strip():
            answer, expect[pid] = s.text, 1
        else:
            answer, expect[pid] = "no such answer", None
        rows.append({"id": pid, "prompt": prompt, "answer": answer})
    assert sum(v == 0 for v in expect.values()) >= 3 and sum(v == 1 for v in expect.values()) >= 2
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), expect


@pytest.fixture()
def home_and_expect(tmp_path, problems_file):
    path, expect = problems_file
    home_dir = tmp_path / "home"
    assert main(["import", path, "--dataset", "t", "--grader", "exact", "--home", str(home_dir)]) == 0
    return open_home(home_dir), expect


def test_references_hold_only_verified_correct_responses_at_the_first_successful_try(home_and_expect,
                                                                                     teacher):
    home, expect = home_and_expect
    summary = collect_references(home, None, "t", CONFIG, teacher_id="tiny", backend=teacher[1],
                                 progress=False)
    solved = {pid: a for pid, a in expect.items() if a is not None}
    unsolved = sorted(pid for pid, a in expect.items() if a is None)
    assert summary["solved"] == len(solved) and summary["unsolved"] == len(unsolved)
    assert summary["unsolved_ids"] == unsolved[:10] and summary["tried"] == len(expect)
    files = reference_files(home, "t", "tiny")
    table = pq.read_table(files).sort_by("problem_id")
    assert table.schema == REFERENCE_SCHEMA
    refs = {r["problem_id"]: r for r in table.to_pylist()}
    assert {pid: r["attempt"] for pid, r in refs.items()} == solved
    answers = {r["id"]: r["answer"]
               for r in pq.read_table(home.problems_dir("t") / "part-00000.parquet").to_pylist()}
    for pid, r in refs.items():
        assert verify("exact", r["response"], answers[pid]) == "correct"
        assert r["teacher_id"] == "tiny" and r["dataset"] == "t"


def test_rerun_retries_nothing_and_a_lost_done_marker_retries_only_that_batch(home_and_expect, teacher):
    home, expect = home_and_expect
    collect_references(home, None, "t", CONFIG, teacher_id="tiny", backend=teacher[1], progress=False)
    folder = home.references_dir("t", "tiny")
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}
    again = collect_references(home, None, "t", CONFIG, teacher_id="tiny", backend=None, backend_name="none",
                               progress=False)  # nothing to do: no backend is loaded
    assert again["already_done"] and again["tried"] == 0
    assert again["unsolved"] == sum(v is None for v in expect.values())
    # A kill between a batch's references and its done marker: the marker is missing.
    last_marker = sorted(folder.glob("done-*.json"))[-1]
    lost = json.loads(last_marker.read_text())
    last_marker.unlink()
    resumed = collect_references(home, None, "t", CONFIG, teacher_id="tiny", backend=teacher[1],
                                 progress=False)
    assert resumed["tried"] == len(lost["unsolved"]) and resumed["solved"] == 0
    table = pq.read_table(batch_files(folder))
    ids = table["problem_id"].to_pylist()
    assert len(ids) == len(set(ids)) == sum(v is not None for v in expect.values())
    assert set(done_problems(folder)) == set(expect)
    for name, data in snapshot.items():
        if name != last_marker.name:
            assert (folder / name).read_bytes() == data


def test_one_greedy_try_solves_only_the_greedy_problems(home_and_expect, teacher):
    home, expect = home_and_expect
    greedy_only = replace(CONFIG, tries=1)
    summary = collect_references(home, None, "t", greedy_only, teacher_id="g", backend=teacher[1],
                                 progress=False)
    assert summary["solved"] == sum(v == 0 for v in expect.values())
    assert summary["samples"] == len(expect)  # one greedy sample per problem


def test_teacher_cli_through_the_transformers_backend(home_and_expect, teacher, capsys):
    home, expect = home_and_expect
    model_dir = teacher[0]
    args = ["teacher", "--teacher", str(model_dir), "--dataset", "t", "--tries", "3", "-k", "2",
            "--max-new-tokens", "6", "--batch-size", "5", "--backend", "transformers", "--grader-workers",
            "1", "--home", str(home.root)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    from paced.backends.base import model_id

    assert summary["teacher_id"] == model_id(model_dir)
    assert summary["solved"] == sum(v is not None for v in expect.values())
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["already_done"] is True


def test_sharded_teacher_jobs_together_equal_the_whole_pool_run(home_and_expect, teacher):
    from paced.store.partition import Shard

    home, expect = home_and_expect
    summaries = [collect_references(home, None, "t", CONFIG, teacher_id="sharded", backend=teacher[1],
                                    progress=False, shard=Shard(r, 3)) for r in range(3)]
    assert sum(s["tried"]
               for s in summaries) == len(expect) and [s["shard"] for s in summaries] == ["0/3", "1/3", "2/3"]
    collect_references(home, None, "t", CONFIG, teacher_id="whole", backend=teacher[1], progress=False)
    sharded, whole = (pq.read_table(reference_files(home, "t", t)).sort_by("problem_id")
                      for t in ("sharded", "whole"))
    assert sharded.drop(["teacher_id"]).equals(whole.drop(["teacher_id"]))
    folder = home.references_dir("t", "sharded")
    assert set(done_problems(folder)) == set(expect)
    assert all("-s0000" in p.name for p in folder.glob("done-*.json"))
    again = collect_references(home, None, "t", CONFIG, teacher_id="sharded", backend=None,
                               backend_name="none", progress=False, shard=Shard(1, 3))
    assert again["already_done"]
