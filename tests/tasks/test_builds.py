"""The built-in models in a data home: the shipped builds, installing them, training with a gate."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from pretrain_helpers import TINY, tiny_recipe

from paced.cli import main
from paced.errors import PacedError
from paced.tasks import pretrain
from paced.tasks.arithmetic import generate_problems
from paced.tasks.builds import (
    SHIPPED_DIR,
    GateError,
    build_model,
    compute_file_hashes,
    install_model,
    read_build_record,
    read_shipped_record,
)
from paced.tasks.gates import GATES, AccuracyGate, compute_gate_failures
from paced.tasks.pretrain import EVAL_SEED, RECIPES, ModelRecipe, PretrainConfig, accuracy_by_difficulty

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch_threads():
    import torch

    torch.set_num_threads(1)


# --- the shipped builds -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_shipped_model_matches_its_recipe_and_the_hashes_in_its_build_json(name):
    record = read_shipped_record(RECIPES[name])  # raises on a recipe mismatch or a wrong hash
    assert record["files"] == compute_file_hashes(SHIPPED_DIR / name)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["files"])
    assert record["gate"]["passed"] and record["gate"] == GATES[name].to_json() | {"passed": True}
    assert compute_gate_failures(GATES[name], record["accuracy"]) == []
    kept = record["attempts"][-1]
    assert kept["seed"] == record["seed"] and kept["passed"] and kept["failures"] == []
    assert kept["accuracy"] == record["accuracy"]
    assert not any(attempt["passed"] for attempt in record["attempts"][:-1])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_installed_model_has_its_recorded_accuracy(name, tmp_path, torch_threads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    installed = install_model(RECIPES[name], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(installed.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(installed.path)
    recipe = RECIPES[name]
    problems = generate_problems(
        recipe.eval_problems_per_operation, EVAL_SEED, max_digits=recipe.pretrain.max_digits, operations="+"
    )
    measured = accuracy_by_difficulty(model, tokenizer, problems)
    recorded = installed.record["accuracy"]["+"]
    # The same weights greedy-decode the same way on any CPU, up to a rare near-tie (1 problem = 1 %).
    assert measured == pytest.approx(recorded, abs=0.02)


def test_install_copies_the_shipped_build_keeps_it_and_repairs_a_damaged_copy(tmp_path):
    recipe = RECIPES["quick-teacher"]
    first = install_model(recipe, tmp_path)
    assert first.installed and not first.reused and first.path == tmp_path / "quick-teacher"
    assert compute_file_hashes(first.path) == read_shipped_record(recipe)["files"]
    assert first.record["installed"]["from"] == "shipped"
    again = install_model(recipe, tmp_path)
    assert again.reused and again.installed

    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated copy in the home
    repaired = install_model(recipe, tmp_path)
    assert not repaired.reused and compute_file_hashes(repaired.path) == read_shipped_record(recipe)["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quick-teacher"]  # no temp folders left


def test_a_damaged_shipped_file_is_named_and_nothing_is_installed(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR / "quick-teacher", shipped / "quick-teacher")
    tokenizer = shipped / "quick-teacher" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<unk>", "<UNK>"))
    with pytest.raises(PacedError, match=r"tokenizer\.json is damaged"):
        install_model(RECIPES["quick-teacher"], tmp_path / "models", shipped_dir=shipped)
    assert not (tmp_path / "models" / "quick-teacher").exists()
    with pytest.raises(PacedError, match="another recipe"):
        install_model(tiny_recipe("quick-teacher"), tmp_path / "models")


# --- training here, with a gate ---------------------------------------------------------------


def test_gate_failures_name_each_missed_bound():
    gate = AccuracyGate(minimum={"1": 0.9, "4": 0.6}, maximum={"2": 0.5})
    accuracy = {"+": {"1": 1.0, "2": 0.7, "4": 0.12, "all": 0.5}}
    assert compute_gate_failures(gate, accuracy) == ["4-digit addition 12 % < 60 %",
                                                     "2-digit addition 70 % > 50 %"]
    assert compute_gate_failures(AccuracyGate(minimum={"3": 0.1}),
                                 accuracy) == ["3-digit addition not measured < 10 %"]
    with pytest.raises(PacedError, match="must be in"):
        AccuracyGate(minimum={"1": 1.5})


def test_build_writes_a_loadable_model_and_reuses_the_cache(tmp_path, torch_threads):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = tiny_recipe()
    built = build_model(recipe, tmp_path, threads=1, progress=False)
    assert not built.reused and built.path == tmp_path / "tiny"
    record = json.loads((built.path / "build.json").read_text())
    assert record["config"] == recipe.to_json() and record["steps"] == 20
    assert set(record["accuracy"]) == {"+", "-"} and set(record["accuracy"]["+"]) >= {"1", "4", "all"}
    assert {"seconds", "seed", "paced_version", "pass_rate_spread", "machine"} <= set(record)
    assert record["files"] == compute_file_hashes(built.path) and record["gate"] is None
    model = AutoModelForCausalLM.from_pretrained(built.path)
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    ids = tokenizer("12+34=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12+34="
    assert model.config.head_dim == 32 and model.config.eos_token_id == tokenizer.eos_token_id
    weights = built.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    again = build_model(recipe, tmp_path, threads=1, progress=False)
    assert again.reused and again.record == record and weights.stat().st_mtime_ns == stamp

    changed = build_model(tiny_recipe(steps=12), tmp_path, threads=1, progress=False)
    assert not changed.reused and changed.record["steps"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp folders left behind


def test_a_build_that_misses_its_gate_on_every_seed_fails_clearly_and_leaves_nothing(tmp_path, torch_threads):
    impossible = AccuracyGate(minimum={"4": 1.0})  # a 20-step model of 30k parameters does not carry
    with pytest.raises(GateError,
                       match=r"tiny missed its accuracy gate with every seed tried \(0, 1;") as err:
        build_model(tiny_recipe(), tmp_path, threads=1, progress=False, gate=impossible, attempts=2)
    assert "4-digit addition" in err.value.message and "without --rebuild" in err.value.message
    assert [a["seed"] for a in err.value.detail["attempts"]] == [0, 1]
    assert list(tmp_path.iterdir()) == []


def learning_recipe(seed: int = 0):
    """A tiny recipe that learns a little of 1-2-digit arithmetic, so its accuracy depends on the seed."""
    config = PretrainConfig(steps=60, batch_size=32, warmup_steps=5, learning_rate=1e-2, max_digits=2,
                            digit_weights=(1.0, 1.0), seed=seed)
    return ModelRecipe("learner", TINY, config, eval_problems_per_operation=40, passrate_problems=8,
                       passrate_samples=2)


def gate_only(seed: int, accuracy: dict[int, dict]) -> AccuracyGate | None:
    """A gate that `seed`'s accuracy meets and every earlier seed's misses, if one exists."""
    for op in ("+", "-"):
        for level, value in sorted(accuracy[seed][op].items()):
            earlier = [accuracy[s][op][level] for s in range(seed)]
            if value > max(earlier):
                return AccuracyGate(minimum={level: value}, operation=op)
            if value < min(earlier):
                return AccuracyGate(maximum={level: value}, operation=op)
    return None


def test_a_gate_missed_by_the_first_seeds_is_retried_with_the_next_and_recorded(tmp_path, torch_threads):
    # Measure what seeds 0, 1, 2 reach, then ask for a bound only a later seed meets.
    accuracy = {
        seed: build_model(learning_recipe(seed), tmp_path / f"s{seed}", threads=1,
                          progress=False).record["accuracy"]
        for seed in range(3)
    }
    kept, gate = next((s, g) for s in (1, 2) if (g := gate_only(s, accuracy)) is not None)

    built = build_model(learning_recipe(), tmp_path / "gated", threads=1, progress=False, gate=gate,
                        attempts=3)
    record = read_build_record(built.path)
    assert record["seed"] == kept and record["accuracy"] == accuracy[kept]
    assert [(a["seed"], a["passed"]) for a in record["attempts"]] == [(s, s == kept) for s in range(kept + 1)]
    assert record["attempts"][0]["failures"] and record["gate"] == gate.to_json() | {"passed": True}
    assert record["config"] == learning_recipe().to_json()  # the recipe as asked: a rerun reuses this build
    assert build_model(learning_recipe(), tmp_path / "gated", threads=1, progress=False, gate=gate).reused


def test_building_a_student_builds_its_teacher_first(tmp_path, torch_threads):
    teacher = tiny_recipe("tiny-teacher", steps=6)
    student = build_model(tiny_recipe("tiny-student", 6, init_from=teacher), tmp_path, threads=1,
                          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-student", "tiny-teacher"]
    teacher_record = read_build_record(tmp_path / "tiny-teacher")
    assert student.record["init_from"] == {"name": "tiny-teacher", "keep_layers": [1],
                                           "sha256": teacher_record["files"]["model.safetensors"]}
    assert student.record["config"]["init_from"] == teacher.to_json()
    assert build_model(teacher, tmp_path, threads=1, progress=False).reused


# --- the command ------------------------------------------------------------------------------


def test_cli_help_lists_the_build_options(capsys):
    assert main(["tasks", "build-models", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--home" in out and "--force" in out and "--rebuild" in out
    assert main(["tasks"]) == 2


def test_cli_installs_the_shipped_quick_models_by_default(tmp_path, capsys):
    argv = ["tasks", "build-models", "--home", str(tmp_path), "--quick", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["teacher"]["installed"] and not summary["teacher"]["reused"]
    assert summary["student"]["accuracy"] == read_shipped_record(RECIPES["quick-student"])["accuracy"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["student"]["reused"]
    assert main(argv + ["--attempts", "0", "--rebuild"]) == 1
    assert "--attempts must be >= 1" in capsys.readouterr().err


def test_cli_rebuild_trains_then_reuses_and_prints_a_json_summary(tmp_path, capsys, monkeypatch,
                                                                  torch_threads):
    # The real command on recipes small enough for a test (the registry is a plain dict).
    teacher = tiny_recipe("quick-teacher", steps=8)
    monkeypatch.setitem(pretrain.RECIPES, "quick-teacher", teacher)
    monkeypatch.setitem(pretrain.RECIPES, "quick-student", tiny_recipe("quick-student", 8, init_from=teacher))
    monkeypatch.setitem(GATES, "quick-teacher", AccuracyGate())
    monkeypatch.setitem(GATES, "quick-student", AccuracyGate())
    argv = ["tasks", "build-models", "--home", str(tmp_path), "--quick", "--rebuild", "--threads", "1",
            "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"teacher", "student"}
    assert summary["teacher"]["path"] == str(tmp_path.resolve() / "models" / "quick-teacher")
    assert not summary["student"]["reused"] and not summary["student"]["installed"]
    assert "all" in summary["student"]["accuracy"]["+"]
    assert main(argv + ["--only", "student"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert set(again) == {"student"} and again["student"]["reused"]
    record = json.loads((tmp_path / "models" / "quick-student" / "build.json").read_text())
    assert record["init_from"]["name"] == "quick-teacher" and record["init_from"]["keep_layers"] == [1]
