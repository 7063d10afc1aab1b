"""`paced train` on tiny random models and real shard files: losses, skipping, resume, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from trainer_helpers import make_rows, parameters, summary_of, train_args, write_shards

from paced.cli import main


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("loss", ["forward", "reverse", "jsd", "akl"])
def test_each_loss_trains_five_steps_with_a_finite_loss_and_moves_the_student(models, tmp_path, capsys, loss):
    shards = write_shards(tmp_path / "m", make_rows(24), shard_size=8)
    assert main(train_args(models, shards, tmp_path / "out", "--loss", loss, "--steps", "5")) == 0
    summary = summary_of(capsys)
    assert summary["steps"] == 5 and summary["stages"][0]["on_policy"] == (loss == "reverse")
    assert math.isfinite(summary["loss_first"]) and math.isfinite(summary["loss_last"])
    assert summary["loss_first"] > 0 and summary["train_tokens"] > 0
    assert changed(parameters(models[0]), parameters(tmp_path / "out" / "final"))
    state = json.loads((tmp_path / "out" / "final" / "trainer_state.json").read_text())
    assert state["finished"] and state["step"] == 5 and state["config"]["token"] is None
    assert {"torch", "numpy", "python"} <= set(state["rng"]) and state["paced_version"]


def test_forward_kl_towards_a_teacher_goes_down(models, tmp_path, capsys):
    shards = write_shards(tmp_path / "m", make_rows(16, weights=lambda i: 1.0), shard_size=16)
    assert main(train_args(models, shards, tmp_path / "out", "--steps", "30", "--lr", "1e-2")) == 0
    summary = summary_of(capsys)
    assert summary["loss_last"] < 0.5 * summary["loss_first"]


def test_zero_weight_batches_and_rows_without_completion_are_skipped_and_counted(models, tmp_path, capsys):
    # 24 rows; rows 2, 5, 8, ... have no completion; batches of 4 are cut from the others in order:
    # rows 0,1,3,4 and 6,7,9,10 weigh 0 (skipped), then 12,13,15,16 and 18,19,21,22 train; the
    # stream has read up to row 22, passing 7 rows without a completion.
    rows = make_rows(24, weights=lambda i: 0.0 if i < 12 else 0.5, completion_every=3)
    shards = write_shards(tmp_path / "m", rows, shard_size=24)
    assert main(train_args(models, shards, tmp_path / "out", "--steps", "2")) == 0
    summary = summary_of(capsys)
    assert summary["skipped_zero_weight_batches"] == 2
    assert summary["skipped_rows_without_completion"] == 7
    assert summary["steps"] == 2 and summary["train_tokens"] > 0
    # Nothing to learn anywhere: a clear error, not an endless loop.
    dead = write_shards(tmp_path / "dead", make_rows(8, weights=lambda i: 0.0), shard_size=4)
    assert main(train_args(models, dead, tmp_path / "out2", "--steps", "2")) == 1
    assert "nothing to train on" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["forward", "reverse"])
def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(models, tmp_path, capsys, loss):
    # 30 rows in shards of 8, 8, 8, 6, 26 with a completion; 2 micro-batches x 4 rows a step:
    # step 3 stops inside the last shard of epoch 0, step 6 inside epoch 1.
    shards = write_shards(tmp_path / "m", make_rows(30, completion_every=7), shard_size=8)
    args = ["--loss", loss, "--steps", "6", "--grad-accum", "2", "--warmup-steps", "2", "--save-every", "3"]
    assert main(train_args(models, shards, tmp_path / "a", *args)) == 0
    full = summary_of(capsys)
    state = json.loads((tmp_path / "a" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and not state.get("finished")
    # 24 rows trained. Off-policy: rows 0..26 less 6, 13, 20 (no completion), the next unread row
    # is row 3 of shard 3 (row 27). On-policy needs no completion: rows 0..23.
    assert state["position"] == {"epoch": 0, "shard": 3, "row": 3 if loss == "forward" else 0}
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    assert main(train_args(models, shards, tmp_path / "b", *args, "--resume")) == 0
    resumed = summary_of(capsys)
    for key in ("steps", "train_tokens", "skipped_rows_without_completion", "loss_last"):
        assert resumed[key] == full[key], key
    a, b = parameters(tmp_path / "a" / "final"), parameters(tmp_path / "b" / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
    assert changed(parameters(tmp_path / "a" / "checkpoint-3"), a)
    # Resuming a finished run is a no-op that prints the same summary.
    assert main(train_args(models, shards, tmp_path / "b", *args, "--resume")) == 0
    assert summary_of(capsys)["loss_last"] == full["loss_last"]


def test_two_stages_run_in_order_with_their_own_policy(models, tmp_path, capsys):
    shards = write_shards(tmp_path / "m", make_rows(16), shard_size=8)
    assert main(train_args(models, shards, tmp_path / "out", "--stages", "forward:2,reverse:2,jsd:1:on")) == 0
    stages = summary_of(capsys)["stages"]
    assert [(s["loss"], s["steps_done"], s["on_policy"]) for s in stages] == [
        ("forward", 2, False), ("reverse", 2, True), ("jsd", 1, True)]


def test_self_distillation_with_a_teacher_prompt_template(models, tmp_path, capsys):
    student, _ = models
    shards = write_shards(tmp_path / "m", make_rows(8), shard_size=8)
    args = train_args((student, student), shards, tmp_path / "out", "--loss", "reverse", "--steps", "3",
                      "--teacher-prompt-template", "1+1=2 {prompt}")
    assert main(args) == 0
    summary = summary_of(capsys)
    assert summary["loss_first"] > 0  # the same weights, but the teacher's context differs
    assert changed(parameters(student), parameters(tmp_path / "out" / "final"))


def test_encoding_lines_up_completion_tokens_of_both_sides():
    from paced.tasks.models import build_tokenizer
    from paced.trainer.tokens import completion_ids, encode_side, fit_lengths, prompt_ids

    tok = build_tokenizer()
    prompts = ["1+2=", "12+345="]
    targets = completion_ids(tok, ["3", "357"])
    assert targets[1] == [tok.convert_tokens_to_ids(c) for c in "357"] + [tok.eos_token_id]
    sides = [prompt_ids(tok, prompts), prompt_ids(tok, prompts, "9-9=0 {prompt}")]
    sides, targets = fit_lengths(sides, targets, max_length=64)
    for prompts_of_side in sides:
        side = encode_side(prompts_of_side, targets, tok.pad_token_id)
        for b, target in enumerate(targets):
            n = int(side.mask[b].sum())
            assert n == len(target)
            predicted = side.input_ids[b, side.index[b, :n] + 1].tolist()  # logits at i predict i + 1
            assert predicted == target
            assert int(side.attention_mask[b].sum()) == len(prompts_of_side[b]) + n
    # Cut to fit: the completion loses its tail, the longer (teacher) prompt decides the room.
    cut_sides, cut = fit_lengths([[[1, 5, 6]], [[1, 7, 7, 7, 5, 6]]], [[8, 9, 10]], max_length=8)
    assert cut == [[8, 9]] and cut_sides[1] == [[1, 7, 7, 7, 5, 6]] and cut_sides[0] == [[1, 5, 6]]


@pytest.mark.parametrize("extra, message", [
    (["--stages", "forward:3,kl:2"], "stage loss must be one of"),
    (["--stages", "forward-300"], "write LOSS:STEPS"),
    (["--from", "/nonexistent/shards"], "no such folder"),
    (["--from", "http://127.0.0.1:9/v1/runs/r1", "--http-retries", "0"], "cannot reach the service"),
    (["--teacher-prompt-template", "no placeholder"], "must contain {prompt}"),
    (["--lr", "0"], "`lr` must be > 0"),
])
def test_bad_input_is_one_clear_line_and_exit_1(models, tmp_path, capsys, extra, message):
    shards = write_shards(tmp_path / "m", make_rows(8), shard_size=8)
    args = train_args(models, shards, tmp_path / "out", "--steps", "1")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_existing_out_needs_resume_and_the_same_settings(models, tmp_path, capsys):
    shards = write_shards(tmp_path / "m", make_rows(8), shard_size=8)
    assert main(train_args(models, shards, tmp_path / "out", "--steps", "1")) == 0
    assert main(train_args(models, shards, tmp_path / "out", "--steps", "1")) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(train_args(models, shards, tmp_path / "out", "--steps", "1", "--resume", "--lr", "1e-2")) == 1
    assert "differ from the checkpoint's run: lr" in capsys.readouterr().err


def test_teacher_with_another_vocabulary_is_refused(models, tmp_path, capsys):
    from trainer_helpers import TINY

    from paced.tasks.models import build_tokenizer, init_model, save_model

    other = build_tokenizer("0123456789+-=*")
    save_model(init_model(other, TINY), other, tmp_path / "other")
    shards = write_shards(tmp_path / "m", make_rows(8), shard_size=8)
    assert main(train_args((models[0], tmp_path / "other"), shards, tmp_path / "out", "--steps", "1")) == 1
    assert "different tokenizer vocabularies" in capsys.readouterr().err


def test_aligned_logits_keep_only_completion_positions_and_match_the_full_forward(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paced.trainer.loop import aligned_logits
    from paced.trainer.tokens import completion_ids, encode_side, prompt_ids

    model = AutoModelForCausalLM.from_pretrained(models[1]).eval()
    tok = AutoTokenizer.from_pretrained(models[1])
    side = encode_side(prompt_ids(tok, ["1+2=", "12+34="]), completion_ids(tok, ["3", "46"]),
                       tok.pad_token_id)
    with torch.no_grad():
        kept = aligned_logits(model, side, model.config.vocab_size)
        full = model(input_ids=side.input_ids, attention_mask=side.attention_mask).logits
    expected = full.gather(1, side.index.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    assert kept.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(kept[side.mask], expected[side.mask])


@pytest.mark.slow  # a fresh interpreter imports torch + transformers
def test_resume_after_sigkill_matches_the_uninterrupted_run(models, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    shards = write_shards(tmp_path / "m", make_rows(24), shard_size=8)
    args = ["--steps", "60", "--save-every", "2", "--warmup-steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "paced.cli",
                             *train_args(models, shards, tmp_path / "b", *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    checkpoint = tmp_path / "b" / "checkpoint-4"
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run ended before it could be killed"
    assert main(train_args(models, shards, tmp_path / "b", *args, "--resume")) == 0
    assert not list((tmp_path / "b").glob(".tmp-*"))
    assert main(train_args(models, shards, tmp_path / "a", *args)) == 0
    a, b = parameters(tmp_path / "a" / "final"), parameters(tmp_path / "b" / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
