"""Training logs (`paced train --report-to`): OUT/metrics.jsonl parsed and TensorBoard's event
files read back with its EventAccumulator, against the run's summary and the shard weights; a
resume that trains steps again writes each step once; group mode's figures. Tiny real models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trainer_helpers import make_rows, summary_of, train_args, write_shards

from paced.cli import main
from paced.curriculum import effective_sample_size
from paced.errors import InputError
from paced.trainer.config import TrainConfig
from paced.trainer.loop import WarmupCosine
from paced.trainer.report import compute_group_frontier, parse_report_to


def weight(i: int) -> float:
    return 0.0 if i % 4 == 0 else 0.25 * (i % 4) + 0.1 * (i % 3)


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_step_lines_match_the_summary_and_a_resume_writes_each_step_once(models, tmp_path, capsys):
    rows = make_rows(16, weights=weight)
    source = write_shards(tmp_path / "shards", rows, shard_size=8)
    out = tmp_path / "out"
    args = train_args(models, source, out, "--steps", "4", "--save-every", "2",
                      "--report-to", "jsonl", "--report-to", "tensorboard")
    assert main(args) == 0
    summary = summary_of(capsys)
    lines = read_lines(out)
    steps = [line for line in lines if line["kind"] == "step"]
    assert [line["step"] for line in steps] == [1, 2, 3, 4] and len(lines) == 4
    assert steps[-1]["loss"] == pytest.approx(summary["loss_last"])
    assert steps[0]["loss"] == pytest.approx(summary["loss_first"])
    assert sum(line["tokens"] for line in steps) == summary["train_tokens"]
    assert sum(line["seconds"] for line in steps) == pytest.approx(summary["train_seconds"], abs=0.01)
    schedule = WarmupCosine(0, 4, 0.1)
    for n, line in enumerate(steps):  # batch n holds rows 4n..4n+3, in order
        w = [weight(i) for i in range(4 * n, 4 * n + 4)]
        assert line["rows"] == 4 and line["zero_weight_share"] == 0.25
        assert line["weight_ess"] == pytest.approx(effective_sample_size(w))
        assert line["weight_mean"] == pytest.approx(sum(w) / 4)
        assert line["lr"] == pytest.approx(3e-3 * schedule(n))
    board = scalars(out)
    for name in ("loss", "lr", "tokens", "weight_ess", "weight_mean", "zero_weight_share"):
        assert board[f"step/{name}"] == [(line["step"], pytest.approx(line[name])) for line in steps]

    # Killed after step 4, before `final`: the resume from checkpoint-2 trains steps 3 and 4 again.
    shutil.rmtree(out / "final")
    assert main([*args, "--resume"]) == 0
    resumed = summary_of(capsys)
    again = read_lines(out)
    assert [line["step"] for line in again] == [1, 2, 3, 4]
    assert [line["loss"] for line in again] == pytest.approx([line["loss"] for line in steps])
    assert again[-1]["loss"] == pytest.approx(resumed["loss_last"])
    board = scalars(out)  # the old run's events after step 2 are purged
    assert [step for step, _ in board["step/loss"]] == [1, 2, 3, 4]
    assert [value for _, value in board["step/loss"]] == pytest.approx([line["loss"] for line in again])


def test_report_to_none_writes_no_logs_and_bad_names_are_refused(models, tmp_path, capsys):
    source = write_shards(tmp_path / "shards", make_rows(8), shard_size=8)
    assert main(train_args(models, source, tmp_path / "out", "--steps", "1", "--report-to", "none")) == 0
    summary_of(capsys)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / "out" / "tensorboard").exists()
    assert parse_report_to("jsonl, tensorboard") == ["jsonl", "tensorboard"]
    with pytest.raises(InputError, match="unknown 'wandb'.*jsonl, tensorboard, none"):
        parse_report_to("jsonl,wandb")
    with pytest.raises(InputError, match="none turns the logs off"):
        TrainConfig(student="s", teacher="t", source="m", out="o", report_to=("none", "jsonl"))
    assert main(train_args(models, source, tmp_path / "other", "--report-to", "wandb")) == 1
    assert "--report-to: unknown 'wandb'" in capsys.readouterr().err


def test_group_frontier_counts_groups_by_their_pass_rate():
    assert compute_group_frontier([0, 1, 4, 2, 0], 4) == {"groups": 5, "groups_zero": 2, "groups_mid": 2,
                                                          "groups_one": 1}


def test_group_mode_lines_carry_the_zero_weight_share_skips_and_the_groups_frontier(models, tmp_path, capsys):
    from test_trainer_group import group_args, group_home

    home, manifest = group_home(tmp_path, capsys, scheme="uniform")
    out = tmp_path / "out"
    assert main(group_args(models, home, manifest, out, "--steps", "3", "--group-scheme", "hard-filter")) == 0
    group = summary_of(capsys)["group"]
    steps = [line for line in read_lines(out) if line["kind"] == "step"]
    assert [line["step"] for line in steps] == [1, 2, 3]
    assert {line["group_skipped"] for line in steps} == {True, False}  # these seeds: both kinds of step
    assert sum(line["group_samples"] for line in steps) == group["samples"]
    assert sum(line["group_zero_weight_sample_share"] * line["group_samples"] for line in steps) == \
        pytest.approx(group["zero_weight_samples"])
    assert sum(line["group_skipped"] for line in steps) == group["zero_weight_steps"]
    assert sum(line["group_mean_pass_rate"] * line["group_samples"]
               for line in steps) == pytest.approx(group["correct"])
    for line in steps:
        shares = (line["group_share_zero"], line["group_share_mid"], line["group_share_one"])
        assert sum(shares) == pytest.approx(1.0)
        # hard-filter: exactly the groups at p̂ = 0 or 1 weigh 0, and each group has K samples
        assert line["group_zero_weight_sample_share"] == pytest.approx(shares[0] + shares[2])
        assert line["group_skipped"] == (shares[1] == 0) and (line["loss"] is None) == line["group_skipped"]


def test_a_fresh_run_into_the_folder_of_a_killed_one_hides_its_lines_and_events(tmp_path):
    from paced.trainer.checkpoint import Progress
    from paced.trainer.report import Reporter

    for steps in ([1, 2, 3], [1]):  # the first run was killed before any checkpoint: the second starts over
        reporter = Reporter(tmp_path, ("jsonl", "tensorboard"), 0, None, Progress())
        for step in steps:
            reporter.eval(step, {"accuracy": step / 10})
        reporter.close()
    assert read_lines(tmp_path) == [{"kind": "eval", "step": 1, "accuracy": 0.1}]
    assert scalars(tmp_path)["eval/accuracy"] == [(1, pytest.approx(0.1))]
