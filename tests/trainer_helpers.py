"""Shared fixtures of the trainer tests: tiny random models and shard folders, built locally."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from paced.store.files import write_json_atomic, write_parquet_atomic
from paced.store.shards import SHARD_SCHEMA
from paced.tasks.arithmetic import generate_problems
from paced.tasks.models import ModelSize, build_random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TINY = ModelSize(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64, max_positions=64)


def build_models(root: Path) -> tuple[Path, Path]:
    """A tiny random student and a tiny random teacher sharing the built-in tokenizer."""
    student = build_random_model(root / "student", TINY, seed=0)
    return student, build_random_model(root / "teacher", TINY, seed=1)


def make_rows(n: int, weights=None, completion_every: int = 1) -> list[dict]:
    """`n` shard rows of the built-in task; row i has weight weights(i) and, unless
    i % completion_every == completion_every - 1, the right answer as its completion."""
    problems = generate_problems(n, seed=0, max_digits=2)
    rows = []
    for i, (pid, prompt, answer) in enumerate(zip(problems["id"].to_pylist(), problems["prompt"].to_pylist(),
                                                  problems["answer"].to_pylist(), strict=True)):
        has_completion = completion_every == 1 or i % completion_every != completion_every - 1
        rows.append({"position": i, "problem_id": pid, "prompt": prompt,
                     "completion": answer if has_completion else None,
                     "weight": float(weights(i)) if weights else 0.25 + (i % 4) / 4, "pass_rate": 0.5,
                     "n": 8, "dataset": "arith", "guard": "none"})
    return rows


def write_shards(folder: Path, rows: list[dict], shard_size: int) -> Path:
    """A manifest folder as the trainer reads it: shard-00000.parquet ... and manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(rows), shard_size)):
        table = pa.Table.from_pylist(rows[start:start + shard_size], schema=SHARD_SCHEMA)
        write_parquet_atomic(folder / f"shard-{k:05d}.parquet", table)
    write_json_atomic(folder / "manifest.json", {"items": len(rows), "shard_size": shard_size})
    return folder


def train_args(models: tuple[Path, Path], source, out: Path, *extra: str) -> list[str]:
    student, teacher = models
    return ["train", "--student", str(student), "--teacher", str(teacher), "--from", str(source),
            "--out", str(out), "--batch-size", "4", "--lr", "3e-3", "--max-new-tokens", "5", "--no-progress",
            *extra]


def summary_of(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def parameters(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))
