"""`paced train`'s composition root: flags -> the trainer's config and its two measuring jobs."""

from __future__ import annotations

import argparse

import pytest

from paced.errors import InputError
from paced.jobs.train import add_arguments, jobs_from_args
from paced.trainer.loop import run_settings

# What trainer_state.json's "config" held before re-measurement became a job: a checkpoint
# written then must still resume (the settings compared on --resume keep their names).
RECORDED = {
    "student", "teacher", "source", "out", "loss", "steps", "stages", "on_policy", "lr", "min_lr_ratio",
    "warmup_steps", "weight_decay", "max_grad_norm", "batch_size", "grad_accum", "max_length",
    "sample_temperature", "sample_top_p", "max_new_tokens", "teacher_prompt_template", "jsd_beta",
    "akl_head_mass", "loss_chunk_size", "loss_path", "loss_in_place", "seed", "save_every", "resume",
    "token", "consumer", "lease_ttl_seconds",
    "http_retries", "http_timeout_seconds", "refresh_every", "refresh_between_stages", "reprobe_fraction",
    "carry_over_decay", "fresh_samples",
    "refresh_backend", "home", "rollout_k", "rollout_temperature", "rollout_max_new_tokens",
    "rollout_batch_size", "scheme", "alpha", "beta", "prior", "weight_floor", "uniform_mix", "eval_every",
    "eval_dataset", "eval_limit", "eval_max_new_tokens", "device", "progress",
    # added later (a checkpoint without them resumes: a missing setting reads as None, their default)
    "tensor_parallel_size", "gpu_memory_utilization", "dtype", "max_model_len", "enforce_eager",
    "report_to",  # resumable with another value: the logs do not change the result
}


def parse(*flags: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--student", "s", "--teacher", "t", "--from", "m", "--out", "o", *flags])


def test_flags_reach_the_config_that_owns_them_and_shared_ones_reach_both():
    config, remeasure, evaluate = jobs_from_args(parse("--seed", "7", "--home", "H", "--prior", "2,3",
                                                       "--weight-floor", "0.2", "--eval-limit", "5",
                                                       "--max-new-tokens", "9", "--token", "secret"))
    assert (config.seed, remeasure.config.seed, evaluate.config.seed) == (7, 7, 7)
    assert (remeasure.config.home, evaluate.config.home) == ("H", "H")
    assert remeasure.config.max_new_tokens == config.max_new_tokens == 9
    assert remeasure.config.token == "secret"
    assert remeasure.config.weights == {"prior": [2.0, 3.0], "weight_floor": 0.2}
    assert not config.chat_template and not evaluate.config.chat_template
    chat, _, chat_eval = jobs_from_args(parse("--chat-template"))
    assert chat.chat_template and chat_eval.config.chat_template  # held-out prompts rendered as in training
    assert evaluate.config.eval_limit == 5
    settings = run_settings(config, remeasure, evaluate)
    assert set(settings) == RECORDED
    assert settings["token"] is None and settings["prior"] == [2.0, 3.0] and settings["home"] == "H"


def test_weights_over_the_service_are_refused_with_the_place_to_set_them():
    args = parse("--weight-floor", "0.1")
    args.source = "http://127.0.0.1:9/v1/runs/r-000000000000"
    with pytest.raises(InputError, match="POST /v1/runs"):
        jobs_from_args(args)


def test_a_bad_remeasure_setting_is_an_input_error_naming_it():
    with pytest.raises(InputError, match="reprobe_fraction"):
        jobs_from_args(parse("--reprobe-fraction", "2"))
    with pytest.raises(InputError, match=r"carry_over_decay` must be in \[0, 1\]"):
        jobs_from_args(parse("--refresh-every", "2", "--carry-over-decay", "1.5"))
    with pytest.raises(InputError, match="fresh_samples` must be >= 1"):
        jobs_from_args(parse("--refresh-every", "2", "--carry-over-decay", "0.5", "--fresh-samples", "0"))
    with pytest.raises(InputError, match=r"--gpu-memory-utilization must be in \(0, 1\]"):
        jobs_from_args(parse("--gpu-memory-utilization", "1.2"))
    with pytest.raises(InputError, match="--max-model-len only apply to the vllm backend"):
        jobs_from_args(parse("--refresh-backend", "transformers", "--max-model-len", "64"))


def test_vllm_engine_flags_reach_the_refresh():
    _, remeasure, _ = jobs_from_args(parse("--refresh-backend", "vllm", "--tensor-parallel-size", "2",
                                           "--dtype",
                                           "bfloat16", "--max-model-len", "512", "--enforce-eager"))
    assert remeasure.config.engine().backend_kwargs("vllm") == {
        "tensor_parallel_size": 2, "dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True}
