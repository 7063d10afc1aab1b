"""Recipes and pre-training for the built-in task's tiny teacher and student, on the CPU.

Two recipes per build: a **teacher** (larger, trained longer) that solves nearly every held-out
problem, and a **student** (smaller, trained briefly) whose pass rates spread across 0..1. The
`quick-*` recipes are much smaller and faster; they only have to exercise the loop.

Data. Each step draws a fresh batch of random problems in the task's natural format
(`"a+b="` -> `"c</s>"`, the loss on the answer tokens only) from
`numpy.random.default_rng([PRETRAIN_DATA_SEED, recipe seed])`. That stream is independent of
`generate_problems(seed=...)`, which the demo uses for its pools; only problems that exist in
few variants (1-digit ones) can appear in both. The mix is mostly `+` with some `-`, so both
models also know subtraction, the held-out skill the experiment measures forgetting on.
Held-out evaluation uses `generate_problems(seed=EVAL_SEED)`.

Builds (the shipped ones installed into a data home, or trained there with an accuracy gate)
are `paced.tasks.builds`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from paced.errors import InputError
from paced.store.home import validate_name
from paced.tasks.arithmetic import OPERATIONS, generate_problems
from paced.tasks.models import ModelSize, init_model

PRETRAIN_DATA_SEED = 1_000_003  # pre-training batches: rng([PRETRAIN_DATA_SEED, recipe.seed])
EVAL_SEED = 1_000_033  # held-out problems a build reports its accuracy on


@dataclass(frozen=True)
class PretrainConfig:
    """How one model is pre-trained: AdamW, linear warmup then cosine decay, fresh batches."""

    steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # the cosine ends at learning_rate * min_lr_ratio
    decay_fraction: float = 1.0  # the cosine spans the last fraction of steps; before it, constant
    weight_decay: float = 0.01
    max_digits: int = 4
    digit_weights: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)  # sampling weight of 1..max_digits
    subtraction_fraction: float = 0.25  # share of `-` problems, the rest are `+`
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_digits"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise InputError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be > 0, got {self.learning_rate}")
        if not 0 < self.decay_fraction <= 1:
            raise InputError(f"`decay_fraction` must be in (0, 1], got {self.decay_fraction}")
        if not 0 <= self.subtraction_fraction <= 1:
            raise InputError(f"`subtraction_fraction` must be in [0, 1], got {self.subtraction_fraction}")
        if (len(self.digit_weights) != self.max_digits or min(self.digit_weights) < 0
                or not any(self.digit_weights)):
            raise InputError(f"`digit_weights` needs {self.max_digits} weights >= 0, got "
                             f"{self.digit_weights}")


@dataclass(frozen=True)
class ModelRecipe:
    """A named model of the built-in task: its shape and how it is pre-trained.

    With `init_from`, training starts from the layers `keep_layers` of that recipe's build
    (built first if missing) instead of a random init, as DistilBERT starts from its teacher.
    """

    name: str
    size: ModelSize
    pretrain: PretrainConfig
    init_from: ModelRecipe | None = None
    keep_layers: tuple[int, ...] = ()
    eval_problems_per_operation: int = 400
    passrate_problems: int = 300  # held-out `+` problems for the pass-rate spread at K samples
    passrate_samples: int = 8

    def __post_init__(self):
        validate_name(self.name, "model")
        if self.init_from is None:
            if self.keep_layers:
                raise InputError(f"{self.name}: `keep_layers` needs `init_from`")
            return
        source = self.init_from.size
        if (source.hidden_size, source.num_heads, source.intermediate_size) != (
            self.size.hidden_size, self.size.num_heads, self.size.intermediate_size
        ):
            raise InputError(f"{self.name}: only the layer count may differ from {self.init_from.name}")
        if len(self.keep_layers) != self.size.num_layers or not all(
            0 <= i < source.num_layers for i in self.keep_layers
        ):
            raise InputError(
                f"{self.name}: `keep_layers` must name {self.size.num_layers} of the "
                f"{source.num_layers} layers of {self.init_from.name}, got {self.keep_layers}"
            )

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, as build.json stores them


def _recipes() -> dict[str, ModelRecipe]:
    # Tuned on 2 shared AVX-only cores (see build.json for measured seconds and accuracy).
    # Plain-order addition sits on a loss plateau for ~1500-2000 steps at batch 64 before
    # all digit counts improve together, so the teacher gets most of the budget and the
    # student starts from its first layers (a short fine-tune) instead of paying it again.
    mix = dict(digit_weights=(1.0, 2.0, 3.0, 3.0), subtraction_fraction=0.25)
    teacher = ModelRecipe(
        "teacher", ModelSize(hidden_size=96, num_layers=3, num_heads=3, intermediate_size=384),
        PretrainConfig(steps=5000, batch_size=64, learning_rate=3e-3, warmup_steps=100, **mix),
    )
    student = ModelRecipe(
        "student", ModelSize(hidden_size=96, num_layers=2, num_heads=3, intermediate_size=384),
        PretrainConfig(steps=400, batch_size=64, learning_rate=1e-3, warmup_steps=20, seed=1, **mix),
        init_from=teacher, keep_layers=(0, 1),
    )
    quick_teacher = ModelRecipe(
        "quick-teacher", ModelSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
        PretrainConfig(steps=700, batch_size=64, learning_rate=3e-3, warmup_steps=50, **mix),
        eval_problems_per_operation=200, passrate_problems=100,
    )
    quick_student = ModelRecipe(
        "quick-student", ModelSize(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=256),
        PretrainConfig(steps=150, batch_size=64, learning_rate=1e-3, warmup_steps=10, seed=1, **mix),
        init_from=quick_teacher, keep_layers=(0,), eval_problems_per_operation=200, passrate_problems=100,
    )
    return {r.name: r for r in (teacher, student, quick_teacher, quick_student)}


RECIPES: dict[str, ModelRecipe] = _recipes()


# --- data -------------------------------------------------------------------------------------


def sample_texts(rng: np.random.Generator, config: PretrainConfig, n: int) -> tuple[list[str], list[str]]:
    """`n` random (prompt, answer) pairs drawn as the recipe says (digit weights, op mix)."""
    weights = np.asarray(config.digit_weights, dtype=float)
    digits = rng.choice(np.arange(1, config.max_digits + 1), size=n, p=weights / weights.sum())
    subtract = rng.random(n) < config.subtraction_fraction
    swap = rng.random(n) < 0.5
    low = np.where(digits == 1, 0, 10 ** (digits - 1))
    a = rng.integers(low, 10**digits)
    b = rng.integers(0, 10**digits)
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    prompts, answers = [], []
    for x, y, minus in zip(a.tolist(), b.tolist(), subtract.tolist(), strict=True):
        op = "-" if minus else "+"
        prompts.append(f"{x}{op}{y}=")
        answers.append(str(OPERATIONS[op](x, y)))
    return prompts, answers


def encode_examples(tokenizer, prompts: list[str], answers: list[str]):
    """Right-padded `input_ids` and `labels` (-100 outside the answer and its `</s>`)."""
    import torch

    vocab = tokenizer.get_vocab()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        ([bos] + [vocab[c] for c in p], [vocab[c] for c in a] + [eos])
        for p, a in zip(prompts, answers, strict=True)
    ]
    width = max(len(q) + len(r) for q, r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (q, r) in enumerate(rows):
        ids[i, : len(q) + len(r)] = torch.tensor(q + r)
        labels[i, len(q) : len(q) + len(r)] = torch.tensor(r)
    return ids, labels


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup to `learning_rate`, constant, then a cosine down to `lr * min_lr_ratio`.

    The cosine spans the last `decay_fraction` of the steps after warmup (1.0: all of them).
    """
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, round((config.steps - config.warmup_steps) * config.decay_fraction))
    progress = min(1.0, max(0.0, (step - (config.steps - span)) / span))
    floor = config.min_lr_ratio
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- training ---------------------------------------------------------------------------------


def pretrain(model, tokenizer, config: PretrainConfig, *, progress: bool = True) -> list[float]:
    """Train `model` in place on fresh random batches; returns the loss of every step.

    A plain torch loop: AdamW (no decay on norms), gradient clipping at 1.0, loss on answer
    tokens only. Deterministic on the CPU for the same config, model and thread count.
    """
    import torch
    from tqdm import tqdm

    rng = np.random.default_rng([PRETRAIN_DATA_SEED, config.seed])
    torch.manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="pretrain", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        ids, labels = encode_examples(tokenizer, *sample_texts(rng, config, config.batch_size))
        loss = model(input_ids=ids, labels=labels).loss  # right padding: no mask needed (causal)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}", refresh=False)
    model.eval()
    return losses


# --- evaluation -------------------------------------------------------------------------------


def _generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    import torch

    with torch.no_grad():
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **sampling,
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def accuracy_by_difficulty(model, tokenizer, problems: pa.Table, *,
                           batch_size: int = 512) -> dict[str, float]:
    """Greedy-decoding accuracy per difficulty (keys "1".."n") and over all problems ("all").

    `problems` has columns prompt, answer, difficulty. An answer counts when the decoded
    completion (up to `</s>`) equals it exactly.
    """
    prompts = problems.column("prompt").to_pylist()
    answers = problems.column("answer").to_pylist()
    difficulty = np.asarray(problems.column("difficulty").to_pylist())
    if not prompts:
        return {"all": float("nan")}
    max_new = max(len(a) for a in answers) + 1  # room for the `</s>` that ends a right answer
    correct = np.zeros(len(prompts), dtype=bool)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        got = _generate_answers(model, tokenizer, prompts[chunk], max_new, do_sample=False)
        correct[chunk] = [g.strip() == a for g, a in zip(got, answers[chunk], strict=True)]
    result = {str(d): float(correct[difficulty == d].mean()) for d in sorted(set(difficulty.tolist()))}
    result["all"] = float(correct.mean())
    return result


def sample_pass_rates(
    model, tokenizer, problems: pa.Table, *, k: int = 8, temperature: float = 1.0, seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """Per-problem pass rate c/k from `k` samples at `temperature` (HF generate, do_sample)."""
    import torch

    prompts = problems.column("prompt").to_pylist()
    answers = problems.column("answer").to_pylist()
    max_new = max(len(a) for a in answers) + 1
    torch.manual_seed(seed)
    rates = np.zeros(len(prompts))
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        got = _generate_answers(
            model, tokenizer, prompts[chunk], max_new, do_sample=True, temperature=temperature,
            top_k=0, top_p=1.0, num_return_sequences=k,
        )
        hits = np.array([g.strip() == a for g, a in zip(got, np.repeat(answers[chunk], k), strict=True)])
        rates[chunk] = hits.reshape(-1, k).mean(axis=1)
    return rates


def compute_spread(pass_rates: np.ndarray) -> dict[str, float]:
    """Share of problems never solved (p=0), partly solved, always solved (p=1); mean p."""
    p = np.asarray(pass_rates, dtype=float)
    return {
        "never": float(np.mean(p == 0)), "partly": float(np.mean((p > 0) & (p < 1))),
        "always": float(np.mean(p == 1)), "mean": float(p.mean()),
    }


def evaluate_model(model, tokenizer, recipe: ModelRecipe) -> dict:
    """Held-out accuracy by difficulty per operation and the pass-rate spread, for build.json."""
    cfg = recipe.pretrain
    n = recipe.eval_problems_per_operation
    accuracy = {
        op: accuracy_by_difficulty(model, tokenizer,
                                   generate_problems(n, EVAL_SEED, max_digits=cfg.max_digits, operations=op))
        for op in ("+", "-")
    }
    pool = generate_problems(recipe.passrate_problems, EVAL_SEED + 1, max_digits=cfg.max_digits,
                             operations="+")
    rates = sample_pass_rates(model, tokenizer, pool, k=recipe.passrate_samples, seed=cfg.seed)
    spread = compute_spread(rates) | {"k": recipe.passrate_samples, "temperature": 1.0,
                                      "problems": len(rates)}
    return {"accuracy": accuracy, "pass_rate_spread": spread}


# --- students that start from a teacher ------------------------------------------------------


def init_from_layers(source_model, tokenizer, size: ModelSize, keep_layers: tuple[int, ...]):
    """A `size` model holding `source_model`'s embeddings, final norm and layers `keep_layers`."""
    model = init_model(tokenizer, size)
    prefix = "model.layers."
    state = {}
    for key, value in source_model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in keep_layers:
                continue
            key = f"{prefix}{keep_layers.index(int(index))}.{rest}"
        state[key] = value
    model.load_state_dict(state)
    return model
