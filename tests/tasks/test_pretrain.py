"""Pre-training the built-in task's models: data, loop, evaluation, students from teacher layers."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from pretrain_helpers import TINY, tiny_recipe

from paced.errors import InputError
from paced.tasks import pretrain
from paced.tasks.arithmetic import generate_problems
from paced.tasks.models import ModelSize, build_tokenizer, init_model
from paced.tasks.pretrain import (
    ModelRecipe,
    PretrainConfig,
    accuracy_by_difficulty,
    compute_spread,
    encode_examples,
    init_from_layers,
    learning_rate_at,
    sample_pass_rates,
    sample_texts,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch_threads():
    import torch

    torch.set_num_threads(1)


def test_sampled_problems_are_correct_and_follow_the_mix():
    config = PretrainConfig(subtraction_fraction=0.25, digit_weights=(1, 1, 1, 1))
    prompts, answers = sample_texts(np.random.default_rng(0), config, 4000)
    assert all(str(eval(p[:-1])) == a for p, a in zip(prompts, answers, strict=True))  # noqa: S307
    minus = np.mean(["-" in p for p in prompts])  # operands are never negative
    assert 0.21 < minus < 0.29
    longest = [max(len(x) for x in p[:-1].replace("-", "+").split("+")) for p in prompts]
    assert set(longest) == {1, 2, 3, 4}
    again = sample_texts(np.random.default_rng(0), config, 4000)
    assert again == (prompts, answers)


def test_loss_labels_cover_only_the_answer_and_eos():
    tokenizer = build_tokenizer()
    ids, labels = encode_examples(tokenizer, ["12+345=", "1-2="], ["357", "-1"])
    for row_ids, row_labels, answer in zip(ids, labels, ["357", "-1"], strict=True):
        kept = row_labels[row_labels != -100].tolist()
        assert tokenizer.decode(kept, skip_special_tokens=True) == answer
        assert kept[-1] == tokenizer.eos_token_id
        assert row_ids[0] == tokenizer.bos_token_id
    assert ids[1, -1] == tokenizer.pad_token_id  # right padding


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    rates = [learning_rate_at(s, config) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] == pytest.approx(0.1, abs=0.01)
    late = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1, decay_fraction=0.2)
    rates = [learning_rate_at(s, late) for s in range(100)]
    assert rates[10:82] == [1.0] * 72 and rates[90] < 1.0 and rates[-1] == pytest.approx(0.1, abs=0.01)


def test_bad_config_is_refused_with_a_message():
    with pytest.raises(InputError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(InputError, match="digit_weights"):
        PretrainConfig(max_digits=2, digit_weights=(1.0, 1.0, 1.0))


def test_pretraining_reduces_the_loss_deterministically(torch_threads):
    tokenizer = build_tokenizer()
    config = PretrainConfig(steps=60, batch_size=32, warmup_steps=5, learning_rate=1e-2)
    losses = pretrain.pretrain(init_model(tokenizer, TINY, seed=0), tokenizer, config, progress=False)
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    short = PretrainConfig(steps=5, batch_size=32, warmup_steps=5, learning_rate=1e-2)
    first = pretrain.pretrain(init_model(tokenizer, TINY, seed=0), tokenizer, short, progress=False)
    second = pretrain.pretrain(init_model(tokenizer, TINY, seed=0), tokenizer, short, progress=False)
    assert first == second


def test_accuracy_tells_a_learned_level_from_an_unlearned_one(torch_threads):
    tokenizer = build_tokenizer()
    model = init_model(tokenizer, ModelSize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128))
    one_digit = PretrainConfig(
        steps=250, batch_size=64, warmup_steps=20, learning_rate=1e-2, max_digits=1, digit_weights=(1.0,),
        subtraction_fraction=0.0,
    )
    pretrain.pretrain(model, tokenizer, one_digit, progress=False)
    problems = generate_problems(60, seed=5, max_digits=3)
    accuracy = accuracy_by_difficulty(model, tokenizer, problems)
    assert set(accuracy) == {"1", "2", "3", "all"}
    assert accuracy["1"] >= 0.8 and accuracy["3"] <= 0.1
    rates = sample_pass_rates(model, tokenizer, problems, k=4, seed=0)
    assert rates.shape == (60,) and set(np.unique(rates * 4)) <= {0, 1, 2, 3, 4}
    difficulty = np.asarray(problems.column("difficulty").to_pylist())
    assert rates[difficulty == 1].mean() > rates[difficulty == 3].mean()


def test_spread_counts_never_partly_always():
    spread = compute_spread(np.array([0.0, 0.5, 1.0, 1.0]))
    assert spread == {"never": 0.25, "partly": 0.25, "always": 0.5, "mean": 0.625}


def test_student_starts_from_the_chosen_teacher_layers(torch_threads):
    import torch

    tokenizer = build_tokenizer()
    teacher = init_model(tokenizer, TINY, seed=3).eval()
    same = init_from_layers(teacher, tokenizer, TINY, (0, 1)).eval()
    ids = tokenizer(["12+34=", "7-9="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(same(**ids).logits, teacher(**ids).logits)
    student = init_from_layers(teacher, tokenizer, replace(TINY, num_layers=1), (1,))
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with pytest.raises(InputError, match="keep_layers"):
        ModelRecipe("bad", replace(TINY, num_layers=1), PretrainConfig(), init_from=tiny_recipe(),
                    keep_layers=(2,))
