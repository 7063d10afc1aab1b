"""`paced evaluate`: accuracy by difficulty (greedy, mean@k), forgetting vs a base model."""

import json

import pyarrow as pa

from paced.backends import SamplingConfig, load_backend
from paced.cli import main
from paced.jobs.evaluate import compute_accuracy
from paced.store.home import open_home
from paced.store.problems import read_problems
from paced.store.snapshots import new_snapshot_id, write_snapshot


def test_compute_accuracy_by_difficulty():
    import numpy as np

    got = compute_accuracy(np.array([1.0, 0.0, 0.5, 1.0]), [1, 1, 2, None])
    assert got["accuracy"] == 0.625 and got["by_difficulty"] == {"1": 0.5, "2": 0.5, "all": 1.0}
    assert "by_module" not in got


def test_compute_accuracy_by_module_and_difficulty():
    import numpy as np

    got = compute_accuracy(np.array([1.0, 0.0, 0.5, 1.0]), [1, 2, 1, 1], ["add", "add", "mul", None])
    assert got["by_module"] == {"None": {"1": 1.0}, "add": {"1": 1.0, "2": 0.0}, "mul": {"1": 0.5}}


def test_evaluate_reports_greedy_sampled_and_forgetting(tmp_path, tiny_model_dir, capsys):
    home_dir = tmp_path / "home"
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (12, 5), (40, 41), (7, 7), (9, 1)]]
    with load_backend("transformers", tiny_model_dir) as backend:
        greedy = backend.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=6))
    # answers: what the model says greedily for the first four (so it "solves" them), wrong for the rest
    rows = [{"prompt": p, "answer": (g[0].text if i < 4 else "zzz"), "difficulty": 1 + i % 2}
            for i, (p, g) in enumerate(zip(prompts, greedy))]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["import", str(src), "--dataset", "d", "--grader", "exact", "--home", str(home_dir)]) == 0
    home = open_home(home_dir)
    ids = read_problems(home, "d")["id"].to_pylist()
    n = len(ids)
    sid = new_snapshot_id("t")
    write_snapshot(home, "base", pa.table({
        "problem_id": ids, "dataset": ["d"] * n, "student_id": ["base"] * n, "sampling_hash": ["h"] * n,
        "n": [4] * n, "correct": [4] * n, "wrong": [0] * n, "unparseable": [0] * n, "timeout": [0] * n,
        "error": [0] * n, "pass_rate": [1.0] * n, "stale_age": pa.array([0] * n, pa.int32()),
        "snapshot_id": [sid] * n}), sid)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--dataset", "d",
                 "--mastered-student", "base", "--mastered-dataset", "d", "-k", "2", "--max-new-tokens", "6",
                 "--backend", "transformers", "--home", str(home_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    greedy_d = report["model"]["sets"]["d"]["greedy"]
    # exact grading normalises whitespace/case; an empty greedy output is unparseable, not correct
    solvable = sum(1 for r in rows[:4] if r["answer"].strip())
    assert greedy_d["problems"] == 6 and abs(greedy_d["accuracy"] - solvable / 6) < 1e-5
    assert set(greedy_d["by_difficulty"]) == {"1", "2"}
    assert "mean@2" in report["model"]["sets"]["d"]
    assert report["forgetting"]["drop"] == 0.0 and report["forgetting"]["problems"] == 6


def test_evaluate_errors_are_one_line(tmp_path, capsys, tiny_model_dir):
    home = str(tmp_path / "h")
    main(["import", "builtin:arithmetic", "--n", "10", "--dataset", "a", "--home", home])
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--dataset", "a", "--home", home]) == 1
    assert main(["evaluate", "--model", str(tiny_model_dir), "--dataset", "a", "--mastered-student", "x",
                 "--home", home]) == 1
    assert "go together" in capsys.readouterr().err
