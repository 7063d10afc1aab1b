"""Tiny recipes for the pre-training and build tests: seconds to train, never accurate."""

from __future__ import annotations

from dataclasses import replace

from paced.tasks.models import ModelSize
from paced.tasks.pretrain import ModelRecipe, PretrainConfig

TINY = ModelSize(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, max_positions=32)


def tiny_recipe(name: str = "tiny", steps: int = 20, init_from: ModelRecipe | None = None) -> ModelRecipe:
    size, keep = (TINY, ()) if init_from is None else (replace(TINY, num_layers=1), (1,))
    return ModelRecipe(
        name, size, PretrainConfig(steps=steps, batch_size=32, warmup_steps=5), init_from=init_from,
        keep_layers=keep, eval_problems_per_operation=24, passrate_problems=12, passrate_samples=4,
    )
