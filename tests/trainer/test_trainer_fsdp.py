"""`paced train --fsdp` under torchrun: two CPU processes (gloo) shard the student and teacher with
FSDP2, train in step, save gathered checkpoints and resume one to the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from trainer_helpers import build_models, make_rows, parameters, train_args, write_shards

from paced.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(args: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2",
                          "-m", "paced.cli", *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("{")]  # rank 0 prints the summary
    return json.loads(line)


@pytest.mark.slow  # three torchrun launches of two fresh interpreters each
def test_fsdp_trains_in_step_saves_gathered_weights_and_resumes(tmp_path):
    models = build_models(tmp_path / "models")
    shards = write_shards(tmp_path / "m", make_rows(24), shard_size=8)
    args = ["--loss", "forward", "--steps", "4", "--save-every", "2", "--fsdp"]  # the fused loss path
    full = torchrun(train_args(models, shards, tmp_path / "a", *args))
    assert full["world_size"] == 2 and full["steps"] == 4
    first, second = full["parameter_checksums"]
    assert first == second  # the gathered parameters agree on both ranks
    final = parameters(tmp_path / "a" / "final")  # an ordinary save_pretrained folder, whole tensors
    start = parameters(models[0])
    assert final.keys() == start.keys() and all(final[k].shape == v.shape for k, v in start.items())
    assert any(not torch.equal(final[k], v) for k, v in start.items())
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = torchrun(train_args(models, shards, tmp_path / "b", *args, "--resume"))
    assert resumed["loss_last"] == pytest.approx(full["loss_last"], rel=1e-5)
    for key, value in parameters(tmp_path / "b" / "final").items():
        torch.testing.assert_close(value, final[key], rtol=1e-5, atol=1e-6)


def test_fsdp_refuses_one_process_and_on_policy_stages(tmp_path, capsys):
    models = build_models(tmp_path / "models")
    shards = write_shards(tmp_path / "m", make_rows(8), shard_size=8)
    assert main(train_args(models, shards, tmp_path / "a", "--fsdp", "--steps", "1")) == 1
    assert "--fsdp needs several processes" in capsys.readouterr().err
    assert main(train_args(models, shards, tmp_path / "b", "--fsdp", "--loss", "reverse")) == 1
    assert "--fsdp trains off-policy stages only" in capsys.readouterr().err
