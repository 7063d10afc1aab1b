"""`paced train` under torchrun: two CPU processes (gloo) train in step and agree on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from trainer_helpers import build_models, make_rows, parameters, train_args, write_shards


@pytest.mark.slow  # two fresh interpreters import torch + transformers: most of the time
def test_two_gloo_processes_train_in_step_and_rank_0_saves(tmp_path):
    models = build_models(tmp_path / "models")
    shards = write_shards(tmp_path / "m", make_rows(20, completion_every=5), shard_size=8)
    args = train_args(models, shards, tmp_path / "out", "--stages", "forward:2,reverse:1", "--save-every",
                      "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "2",
                          "-m", "paced.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("{")]  # rank 0 prints the summary
    summary = json.loads(line)
    assert summary["world_size"] == 2 and summary["steps"] == 3
    first, second = summary["parameter_checksums"]
    assert first == second  # bit-identical parameters on both ranks after every all-reduce
    final = parameters(tmp_path / "out" / "final")
    assert any(not torch.equal(final[k], v) for k, v in parameters(models[0]).items())
    assert [s["on_policy"] for s in summary["stages"]] == [False, True]
    # Each rank takes every 2nd batch of 4 rows. Off-policy stage: 2 steps x 2 ranks x 4 rows =
    # the 16 rows with a completion among rows 0..18 (4, 9, 14 have none; the stream stops before
    # row 19). The on-policy step needs no completion: rows 19 and 0..6 of epoch 1.
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["position"] == {"epoch": 0, "shard": 2, "row": 3}
    assert summary["skipped_rows_without_completion"] == 3  # counted once, not once per rank
    final_state = json.loads((tmp_path / "out" / "final" / "trainer_state.json").read_text())
    assert final_state["position"] == {"epoch": 1, "shard": 0, "row": 7}
    # The training logs: rank 0 writes each step once, with both ranks' rows and tokens.
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["kind"], x["step"], x["rows"]) for x in lines] == [("step", 1, 8), ("step", 2, 8),
                                                                  ("step", 3, 8)]
    assert sum(x["tokens"] for x in lines) == summary["train_tokens"]
