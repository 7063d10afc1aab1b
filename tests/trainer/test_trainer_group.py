"""On-policy group distillation (`paced train --group-size`): in-group weights, the step's
Σ w·L / Σ w, skipped zero-weight steps, samples committed as rollouts exactly once across a
SIGKILL, refreshes of training samples equal to `paced rollout`'s, the self-distillation
template. Tiny real models, the real grader and store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from api_fixtures import add_snapshot, problem_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer_service import TOKEN, create_run, service  # noqa: F401 - the `service` fixture
from trainer_helpers import parameters, summary_of, train_args

from paced.cli import main
from paced.curriculum import WeightScheme, beta_weight, posterior_weight
from paced.errors import InputError
from paced.jobs.group_rollouts import run_tag
from paced.jobs.refresh import refresh_student
from paced.jobs.rollout import RolloutConfig, rollout
from paced.store.home import open_home
from paced.store.problems import write_problem_part
from paced.store.rollouts import batch_files, read_rollouts, rollout_sets
from paced.store.snapshots import read_snapshot
from paced.trainer.group import PromptRow, compute_group_weights, prior_counts, sample_indices, step_seed

K = 4


def group_home(root: Path, capsys, n: int = 24, scheme: str = "uniform") -> tuple[Path, Path]:
    """A data home whose answers are one digit (a random tiny student gets some right at one
    token), a snapshot of student s1 and a manifest built from it."""
    home = open_home(root / "home")
    problems = pa.table({"id": problem_ids(n), "prompt": [f"{i}+{i}=" for i in range(n)],
                         "answer": [str(i % 10) for i in range(n)],
                         "difficulty": pa.array([1] * n, pa.int32()), "metadata": ["{}"] * n})
    write_problem_part(home, "arith", problems, grader="exact", source="test")
    add_snapshot(home, "s1", [i % 9 for i in range(n)])
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(root / "m"),
                 "--shard-size", "8", "--scheme", scheme, "--no-require-reference", "--home",
                 str(home.root)]) == 0
    capsys.readouterr()
    return home.root, root / "m"


def group_args(models, home: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return [*train_args(models, manifest, out, "--loss", "reverse", "--group-size", str(K),
                        "--max-new-tokens", "1", "--home", str(home), "--grader-workers", "1"), *extra]


def untag(student: str | None) -> str | None:
    """A training-sample student id without its run (`s1-r1a2b3c4d-step2` -> `s1-step2`); any
    other id as it is."""
    return re.sub(r"-r[0-9a-f]{8}(-step\d+)$", r"\1", student) if student else student


def committed(home: Path) -> list[tuple]:
    """Every committed training sample: (student, problem, sample, completion, outcome), sorted."""
    rows = []
    for student in sorted(p.name for p in (home / "rollouts").iterdir()):
        for s in rollout_sets(open_home(home, create=False), student):
            t = read_rollouts(list(s.files))
            rows += [(student, *r) for r in zip(t["problem_id"].to_pylist(), t["sample_idx"].to_pylist(),
                                                t["completion"].to_pylist(), t["outcome"].to_pylist(),
                                                strict=True)]
    return sorted(rows)


# ---------------------------------------------------------------- weights (pure)

counts = st.lists(st.integers(0, 8), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(counts, st.sampled_from(["paced", "hard-filter", "uniform", "paced-posterior"]),
       st.floats(0, 3), st.floats(0, 3))
def test_group_weights_follow_their_scheme(correct, name, alpha, beta):
    c = np.array(correct)
    w = compute_group_weights(c, 8, WeightScheme(name=name, alpha=alpha, beta=beta))
    assert w.shape == c.shape and np.isfinite(w).all() and (w >= 0).all()
    if name == "uniform":
        assert (w == 1).all()
    elif name == "hard-filter":
        assert ((w == 1) == ((c > 0) & (c < 8))).all() and ((w == 0) == ~((c > 0) & (c < 8))).all()
    elif name == "paced":
        np.testing.assert_allclose(w, beta_weight(c / 8, alpha, beta))
        if alpha > 0 and beta > 0:  # Σw = 0 exactly when no group has contrast
            assert (w.sum() == 0) == bool(((c == 0) | (c == 8)).all())
    else:
        assert (w > 0).all()  # the posterior never gives an exact 0


@settings(max_examples=100, deadline=None)
@given(counts, st.lists(st.integers(0, 16), min_size=12, max_size=12), st.floats(0.1, 5), st.floats(0.1, 5))
def test_posterior_adds_the_rows_snapshot_counts_to_the_prior(correct, prior_n, a0, b0):
    c = np.array(correct)
    n0 = np.array(prior_n[:len(c)], dtype=float)
    rows = [PromptRow(f"p{i}", "d", "q", "a", n=float(n), pass_rate=(i % 3) / 2) for i, n in enumerate(n0)]
    c0, n0_read = prior_counts(rows)
    np.testing.assert_array_equal(n0_read, n0)
    w = compute_group_weights(c, 8, WeightScheme(name="paced-posterior", prior=(a0, b0)), c0, n0_read)
    np.testing.assert_allclose(w, posterior_weight(c + c0, 8 + n0, prior=(a0, b0)))
    # rows without counts: the Beta prior alone
    bare = compute_group_weights(c, 8, WeightScheme(name="paced-posterior", prior=(a0, b0)),
                                 *prior_counts([PromptRow("p", "d", "q", "a")] * len(c)))
    np.testing.assert_allclose(bare, posterior_weight(c, np.full(len(c), 8), prior=(a0, b0)))


def test_group_weights_refuse_impossible_counts():
    with pytest.raises(InputError, match="correct <= K"):
        compute_group_weights([9], 8, WeightScheme(name="paced"))


def test_a_problem_twice_in_a_step_gets_the_next_sample_indices():
    from collections import Counter

    taken = Counter()
    assert sample_indices(["a", "b", "a"], 8, taken) == [0, 0, 8]
    assert sample_indices(["a"], 8, taken) == [16]


# ---------------------------------------------------------------- the step (tiny real models)


def test_the_step_loss_is_normalised_over_all_its_micro_batches(models, tmp_path, capsys):
    """Batch 4 × 1 micro-batch and batch 2 × 2 micro-batches draw the same samples (seeds per
    step, problem and sample) and give the same update: Σ w·L / Σ w over the whole step."""
    home, manifest = group_home(tmp_path, capsys, scheme="uniform")
    extra = ("--steps", "3", "--group-scheme", "paced-posterior")
    assert main(group_args(models, home, manifest, tmp_path / "a", *extra)) == 0
    one = summary_of(capsys)
    samples = committed(home)
    args = group_args(models, home, manifest, tmp_path / "b", *extra)
    args[args.index("--batch-size") + 1] = "2"
    assert main([*args, "--grad-accum", "2"]) == 0
    two = summary_of(capsys)
    # the same draws, committed under the second run's own ids beside the first run's
    run_b = [r for r in committed(home) if r not in samples]
    assert len(samples) == len(run_b) == 3 * 4 * K and all(run_tag(tmp_path / "b") in r[0] for r in run_b)
    assert [(untag(r[0]), *r[1:]) for r in run_b] == [(untag(r[0]), *r[1:]) for r in samples]
    assert one["group"] == two["group"] and one["group"]["samples"] == 3 * 4 * K
    a, b = parameters(tmp_path / "a" / "final"), parameters(tmp_path / "b" / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert one["generated_tokens"] > 0 and one["total_flops"] == pytest.approx(
        one["train_flops"] + one["sampling_flops"])


def test_a_step_where_every_weight_is_0_is_skipped_and_counted(models, tmp_path, capsys):
    """hard-filter with K = 1: every group is all right or all wrong, so every weight is 0."""
    home, manifest = group_home(tmp_path, capsys)
    args = group_args(models, home, manifest, tmp_path / "out", "--steps", "3", "--group-scheme",
                      "hard-filter")
    args[args.index("--group-size") + 1] = "1"
    assert main(args) == 0
    summary = summary_of(capsys)
    assert summary["group"]["zero_weight_steps"] == 3 and summary["group"]["zero_weight_step_share"] == 1.0
    assert summary["group"]["zero_weight_samples"] == summary["group"]["samples"] == 12
    assert summary["train_tokens"] == 0 and summary["train_flops"] == 0 and summary["sampling_flops"] > 0
    student = parameters(models[0])
    for name, value in parameters(tmp_path / "out" / "final").items():
        torch.testing.assert_close(value, student[name])  # no update
    assert len(committed(home)) == 12  # the samples were still drawn, graded and committed


def test_group_mode_needs_an_on_policy_stage_and_answers(models, tmp_path, capsys):
    home, manifest = group_home(tmp_path, capsys)
    args = group_args(models, home, manifest, tmp_path / "out", "--steps", "1")
    args[args.index("--loss") + 1] = "forward"
    assert main(args) == 1
    assert "needs an on-policy stage" in capsys.readouterr().err


# ---------------------------------------------------------------- samples as rollouts


def test_training_samples_refresh_like_paced_rollout_of_the_same_checkpoint(models, tmp_path, capsys):
    """Step 2's samples, drawn by checkpoint-2, equal `paced rollout --seed step_seed(0, 2)` of
    that checkpoint on the same problems, sample for sample, and so do their snapshots."""
    home, manifest = group_home(tmp_path / "a", capsys)
    assert main(group_args(models, home, manifest, tmp_path / "out", "--steps", "3", "--save-every", "1",
                           "--group-scheme", "paced")) == 0
    capsys.readouterr()
    student = f"s1-{run_tag(tmp_path / 'out')}-step2"
    trained = read_rollouts(batch_files(next((home / "rollouts" / student).glob("*/arith"))))
    other, _ = group_home(tmp_path / "b", capsys)
    config = RolloutConfig(k=K, temperature=1.0, max_new_tokens=1, seed=step_seed(0, 2))
    rollout(other, tmp_path / "out" / "checkpoint-2", "arith", config, student_id=student,
            problem_ids=sorted(set(trained["problem_id"].to_pylist())), backend_name="transformers",
            progress=False)
    rolled = read_rollouts(batch_files(next((other / "rollouts" / student).glob("*/arith"))))
    assert rolled.to_pylist() == trained.to_pylist()
    snaps = [refresh_student(open_home(h, create=False), student) for h in (home, other)]
    tables = [read_snapshot(open_home(h, create=False), student, s["snapshot_id"]).drop(["snapshot_id"])
              for h, s in zip((home, other), snaps, strict=True)]
    assert tables[0].num_rows == 4 and tables[0].equals(tables[1])


@pytest.mark.slow  # a fresh interpreter imports torch + transformers
def test_sigkill_and_resume_commit_each_sample_once_with_the_same_weights(models, tmp_path, capsys):
    home_b, manifest = group_home(tmp_path / "b", capsys)
    args = ["--steps", "8", "--save-every", "3", "--group-scheme", "paced"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli", *group_args(models, home_b, manifest,
                                                                             tmp_path / "b" / "out", *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300  # kill after step 4's commit: steps 3-4 are replayed from checkpoint-3
    step4 = home_b / "rollouts" / f"s1-{run_tag(tmp_path / 'b' / 'out')}-step4"
    while not step4.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "out" / "final").exists(), "the run ended before it could be killed"
    assert main(group_args(models, home_b, manifest, tmp_path / "b" / "out", *args, "--resume")) == 0
    resumed = summary_of(capsys)
    home_a, manifest_a = group_home(tmp_path / "a", capsys)
    assert main(group_args(models, home_a, manifest_a, tmp_path / "a" / "out", *args)) == 0
    straight = summary_of(capsys)
    rows_a, rows_b = ([(untag(r[0]), *r[1:]) for r in committed(h)] for h in (home_a, home_b))
    assert rows_b == rows_a and len(rows_a) == 8 * 4 * K
    assert len({r[:3] for r in rows_b}) == len(rows_b)  # each (checkpoint, problem, sample) once
    assert resumed["group"] == straight["group"]  # same outcomes, so the same weights and zero-weight counts
    assert 0 < straight["group"]["correct"] < straight["group"]["samples"]
    # The training logs: each step once after the resume, with the uninterrupted run's figures.
    logs = [[{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()]
            for name in ("a", "b")]
    assert [x["step"] for x in logs[1]] == list(range(1, 9))
    assert [x.pop("loss") for x in logs[1]] == pytest.approx([x.pop("loss") for x in logs[0]], nan_ok=True)
    assert logs[1] == logs[0]
    a, b = parameters(tmp_path / "a" / "out" / "final"), parameters(tmp_path / "b" / "out" / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- self-distillation


def test_the_self_distillation_template_reaches_the_teacher_and_not_the_student(models, tmp_path):
    """The teacher's forward sees the row's answer through {answer}; the student's never does."""
    from paced.trainer.checkpoint import load_model
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import Runtime, Trainee, forward_pair

    student_dir = models[0]
    (student, tokenizer), (teacher, _) = (load_model(student_dir, torch.float32, "cpu") for _ in range(2))
    config = TrainConfig(student=str(student_dir), teacher=str(student_dir), source=str(tmp_path),
                         out=str(tmp_path), teacher_prompt_template="{answer}={prompt}")
    seen: dict[str, list] = {}
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_hook(lambda m, a, kw, out, name=name: seen.setdefault(name, []).append(
            kw["input_ids"].tolist()), with_kwargs=True)
    trainee = Trainee(config, Runtime(), tokenizer, student, student, teacher)
    forward_pair(trainee, ["12+3="], ["15"], [tokenizer("15", add_special_tokens=False)["input_ids"]])
    decoded = {k: tokenizer.decode(v[0][0], skip_special_tokens=True) for k, v in seen.items()}
    assert decoded["teacher"].startswith("15=12+3=") and decoded["student"].startswith("12+3=")
    assert "15" not in decoded["student"].removeprefix("12+3=").removesuffix("15")  # only its own completion
    with pytest.raises(InputError, match="carry no `answer`"):
        forward_pair(trainee, ["12+3="], [None], [[1]])


# a chat template in the tiny tokenizer's alphabet: BOS, the user turn between '=' signs, '-' opens the answer
CHAT = ("{{ bos_token }}{% for m in messages %}={{ m['content'] }}={% endfor %}"
        "{% if add_generation_prompt %}-{% endif %}")


@pytest.fixture(scope="module")
def chat_models(models, tmp_path_factory):
    """The tiny student and teacher with a chat template in their tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    out = []
    for src in models:
        dst = tmp_path_factory.mktemp("chat") / src.name
        shutil.copytree(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(dst)
        tokenizer.chat_template = CHAT
        tokenizer.save_pretrained(dst)
        out.append(dst)
    return tuple(out)


def test_chat_template_renders_both_sides_as_generation_does(chat_models, tmp_path):
    """With --chat-template the student's prompt is the user turn the sampler renders, and the
    teacher's is the filled-in --teacher-prompt-template rendered the same way; the completion
    tokens follow both unchanged."""
    from paced.backends.base import render_prompts
    from paced.trainer.checkpoint import load_model
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import Runtime, Trainee, forward_pair

    (student, tokenizer), (teacher, _) = (load_model(chat_models[0], torch.float32, "cpu") for _ in range(2))
    config = TrainConfig(student=str(chat_models[0]), teacher=str(chat_models[0]), source=str(tmp_path),
                         out=str(tmp_path), teacher_prompt_template="{answer}+0={prompt}", chat_template=True)
    seen: dict[str, list] = {}
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_hook(lambda m, a, kw, out, name=name: seen.setdefault(name, []).append(
            kw["input_ids"][0].tolist()), with_kwargs=True)
    trainee = Trainee(config, Runtime(), tokenizer, student, student, teacher)
    target = tokenizer("15", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    forward_pair(trainee, ["12+3="], ["15"], [target])
    want_student = render_prompts(tokenizer, ["12+3="], True)[0]
    want_teacher = render_prompts(tokenizer, ["15+0=12+3="], True)[0]
    assert tokenizer.decode(want_student) == "<s>=12+3==-"
    assert tokenizer.decode(want_teacher) == "<s>=15+0=12+3==-"
    assert seen["student"][0] == want_student + target and seen["teacher"][0] == want_teacher + target


def test_chat_template_samples_are_paced_rollouts_with_the_chat_template(chat_models, tmp_path, capsys):
    """A --chat-template group run samples the rendered chat prompt: step 1's committed samples
    equal `paced rollout --chat-template` of checkpoint-1, filed under the same sampling hash."""
    home, manifest = group_home(tmp_path / "a", capsys)
    assert main(group_args(chat_models, home, manifest, tmp_path / "out", "--steps", "2", "--save-every", "1",
                           "--chat-template")) == 0
    capsys.readouterr()
    student = f"s1-{run_tag(tmp_path / 'out')}-step1"
    config = RolloutConfig(k=K, temperature=1.0, max_new_tokens=1, seed=step_seed(0, 1), chat_template=True)
    folder = home / "rollouts" / student / config.sampling_hash / "arith"
    trained = read_rollouts(batch_files(folder))
    other, _ = group_home(tmp_path / "b", capsys)
    rollout(other, tmp_path / "out" / "checkpoint-1", "arith", config, student_id=student,
            problem_ids=sorted(set(trained["problem_id"].to_pylist())), backend_name="transformers",
            progress=False)
    rolled = read_rollouts(batch_files(other / "rollouts" / student / config.sampling_hash / "arith"))
    assert trained.num_rows == 4 * K and rolled.to_pylist() == trained.to_pylist()


@pytest.mark.slow  # a `paced serve` subprocess
def test_group_training_from_a_service_run_commits_under_the_runs_student(
        models, service, tmp_path, capsys, monkeypatch):  # noqa: F811 - `service`: the imported fixture
    url, home = service
    run = create_run(url)
    monkeypatch.setenv("PACED_TOKEN", TOKEN)
    args = [*train_args(models, f"{url}/v1/runs/{run['run_id']}", tmp_path / "out", "--loss", "reverse"),
            "--steps", "2", "--group-size", "2", "--group-scheme", "uniform", "--home", str(home.root)]
    assert main(args) == 0
    summary = summary_of(capsys)
    assert summary["group"]["samples"] == 2 * 4 * 2 and summary["group"]["correct"] == 0
    tag = run_tag(tmp_path / "out")
    students = sorted(p.name for p in (home.root / "rollouts").iterdir())
    assert students == [f"s1-{tag}-step0", f"s1-{tag}-step1"]
    assert summary["sample_students"] == students
    assert len(committed(home.root)) == 16


@pytest.mark.slow  # two fresh interpreters under torchrun
def test_two_gloo_processes_normalise_over_both_and_equal_one_process(models, tmp_path, capsys):
    """2 ranks × 2 prompts draw the samples 1 process × 4 prompts draws; the weight sum is
    all-reduced, so the update is the same, and rank 0 commits every rank's samples once."""
    import json

    extra = ("--steps", "3", "--group-scheme", "paced-posterior")
    home_a, manifest_a = group_home(tmp_path / "a", capsys)
    assert main(group_args(models, home_a, manifest_a, tmp_path / "a" / "out", *extra)) == 0
    one = summary_of(capsys)
    home_b, manifest_b = group_home(tmp_path / "b", capsys)
    args = group_args(models, home_b, manifest_b, tmp_path / "b" / "out", *extra)
    args[args.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2",
                          "-m", "paced.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("{")]
    two = json.loads(line)
    assert two["world_size"] == 2 and two["group"] == one["group"]
    first, second = two["parameter_checksums"]
    assert first == second
    rows_a, rows_b = ([(untag(r[0]), *r[1:]) for r in committed(h)] for h in (home_a, home_b))
    assert rows_b == rows_a and len(rows_a) == 3 * 4 * K
    a, b = parameters(tmp_path / "a" / "out" / "final"), parameters(tmp_path / "b" / "out" / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def first_step_gradients(models, home: Path, manifest: Path, out: Path, scheme: str, normalize: str) -> dict:
    """The student's gradient of the first group step (no clipping), taken after the update."""
    from paced.jobs.train import group_io
    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import train

    config = TrainConfig(student=str(models[0]), teacher=str(models[1]), source=str(manifest), out=str(out),
                         loss="reverse", steps=1, batch_size=4, lr=3e-3, max_new_tokens=1, max_grad_norm=0.0,
                         progress=False, group_size=K, group_scheme=scheme, group_normalize=normalize,
                         grader_workers=1)
    grads: dict = {}

    def keep(step, model, tokenizer):
        if step == 1:
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None})

    io = group_io(config, str(home))
    try:
        train(config, on_step=keep, group_io=io)
    finally:
        io.grading.close()
    return grads


def test_normalising_by_the_sample_count_scales_the_step_by_its_weight_share(models, tmp_path, capsys):
    """--group-normalize samples divides Σ w·L by the step's N samples instead of Σ w: the same
    gradient times Σ w / N (one factor for every parameter); with uniform weights Σ w = N."""
    home, manifest = group_home(tmp_path, capsys)
    for scheme in ("uniform", "paced-posterior"):
        by_weights, by_samples = (first_step_gradients(models, home, manifest, tmp_path / f"{scheme}-{n}",
                                                       scheme, n) for n in ("weights", "samples"))
        assert by_weights and by_weights.keys() == by_samples.keys()
        ratios = [float((by_samples[n] * by_weights[n]).sum() / (by_weights[n] * by_weights[n]).sum())
                  for n in by_weights if by_weights[n].abs().sum() > 0]
        share = ratios[0]
        if scheme == "uniform":
            assert share == pytest.approx(1.0, rel=1e-6)
        else:  # Beta posterior weights p(1-p) of K = 4 samples: between 0 and 1/4
            assert 0 < share < 0.25
        for n in by_weights:
            torch.testing.assert_close(by_samples[n], by_weights[n] * share, rtol=1e-4, atol=1e-8)


def test_group_normalize_is_checked_and_recorded_only_when_not_the_default(models, tmp_path, capsys):
    home, manifest = group_home(tmp_path, capsys)
    assert main(group_args(models, home, manifest, tmp_path / "out", "--steps", "1",
                           "--group-normalize", "mean")) == 2
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    from paced.trainer.config import TrainConfig

    base = dict(student="s", teacher="t", source="m", out="o", loss="reverse", group_size=K)
    assert "group_normalize" not in TrainConfig(**base).to_json()
    assert TrainConfig(**base, group_normalize="samples").to_json()["group_normalize"] == "samples"
    with pytest.raises(InputError, match="--group-normalize must be one of weights, samples"):
        TrainConfig(**base, group_normalize="mean")
