"""The transformers backend: batched `model.generate`, the fallback where vLLM is missing.

The trainer reuses it for on-policy samples (`HFBackend.from_model`), so it also returns the
generated token ids.

Sampling is exact and seeded per sample, not per batch: generate runs greedy decoding over
scores that a logits processor has divided by the temperature, cut to the top-p nucleus and
perturbed with Gumbel noise drawn from one `torch.Generator` per (prompt, sample). The argmax of
logits/T + Gumbel noise is a draw from softmax(logits/T) (the Gumbel-max trick), so the
distribution is the usual one (no top-k, unlike transformers' sampling defaults), while a
sample's noise depends only on its own seed. Batching stays fast and a prompt's completions do
not depend on which prompts share its batch (up to float rounding of padded batches, which can
flip a token only when two perturbed scores tie to ~1e-6).
"""

from __future__ import annotations

import gc
from pathlib import Path

from paced.backends.base import (
    Backend,
    Completion,
    SamplingConfig,
    check_model_dir,
    check_prompt_lengths,
    cut_at_stop,
    derive_seed,
    render_prompts,
    resolve_seeds,
)
from paced.errors import InputError


class HFBackend(Backend):
    """Generation with a transformers causal LM, loaded from a local directory or in memory."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, *, batch_size: int = 512, device: str | None = None):
        """Load tokenizer and model from `model_dir` (float32 on CPU, bfloat16 on CUDA).

        `batch_size` counts sequences per `model.generate` call (prompts x samples)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = check_model_dir(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a causal LM from {path}: {err}") from err
        self._setup(model, tokenizer, batch_size)

    @classmethod
    def from_model(cls, model, tokenizer, *, batch_size: int = 512) -> HFBackend:
        """Wrap an already loaded model and tokenizer (e.g. the trainer's student); `close`
        drops the references but leaves the objects to their owner."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, batch_size)
        return backend

    def _setup(self, model, tokenizer, batch_size: int) -> None:
        if batch_size < 1:
            raise InputError(f"`batch_size` must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    def generate(
        self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        if self.model is None:
            raise InputError("the transformers backend is closed")
        seeds = resolve_seeds(prompts, params, seeds)
        prompt_ids = render_prompts(self.tokenizer, prompts, params.chat_template)
        check_prompt_lengths(prompt_ids, self.max_length)
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # less padding
        per_call = max(1, self.batch_size // (params.n if params.temperature > 0 else 1))
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), per_call):
                chunk = order[start : start + per_call]
                done = self._generate_chunk([prompt_ids[i] for i in chunk],
                                            [seeds[i] for i in chunk], params)
                for i, completions in zip(chunk, done, strict=True):
                    results[i] = completions
        finally:
            self.model.train(was_training)
        return results

    def _generate_chunk(self, prompt_ids, seeds, params: SamplingConfig) -> list[list[Completion]]:
        import torch

        width = max(len(ids) for ids in prompt_ids)
        device = self.model.device
        k = params.n if params.temperature > 0 else 1  # greedy: decode once, copy n times
        rows = [ids for ids in prompt_ids for _ in range(k)]  # sample j of prompt i: row i*k+j
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in rows],
                                 device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows],
                            device=device)
        max_new = params.max_new_tokens
        if self.max_length is not None:  # rows are cut at the context again in _completion
            max_new = max(1, min(max_new, self.max_length - min(len(ids) for ids in prompt_ids)))
        row_seeds = [derive_seed(s, j) for s in seeds for j in range(k)]
        stop = _StopStrings(self.tokenizer, params.stop, width)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask,
                generation_config=self._generation_config(params, max_new),
                logits_processor=_sampling_processors(params, row_seeds, device),
                stopping_criteria=[stop] if params.stop else None,
            )
        gen = out[:, width:].tolist()
        done = [self._completion(gen[r], stop.hit_length.get(r), params, len(rows[r]))
                for r in range(len(rows))]
        return [done[i * k : (i + 1) * k] * (params.n // k) for i in range(len(prompt_ids))]

    def _generation_config(self, params: SamplingConfig, max_new_tokens: int):
        from transformers import GenerationConfig

        # Greedy over the processed scores (rows are already repeated n times); neutral values for the
        # knobs a model's own generation_config.json could otherwise switch on (penalties, minimum
        # lengths).
        return GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0,
            min_new_tokens=0, use_cache=True,
        )

    def _completion(self, gen: list[int], hit_length: int | None, params: SamplingConfig,
                    prompt_length: int) -> Completion:
        """One row of generate's output cut at EOS, the first stop string or the context."""
        cut, reason = params.max_new_tokens, "length"
        if self.max_length is not None:
            cut = min(cut, self.max_length - prompt_length)
        eos_at = next((k for k, t in enumerate(gen[:cut]) if t in self.eos_ids), None)
        if eos_at is not None:
            cut, reason = eos_at + 1, "stop"
        if hit_length is not None and hit_length <= cut:
            cut, reason = hit_length, "stop"
        ids = gen[:cut]
        text, _ = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
        return Completion(text=text, tokens=len(ids), finish_reason=reason, token_ids=tuple(ids))

    def close(self) -> None:
        had_model = getattr(self, "model", None) is not None
        self.model = self.tokenizer = None
        if had_model:
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _sampling_processors(params: SamplingConfig, row_seeds: list[int], device):
    """Temperature, top-p and seeded Gumbel noise; empty (plain greedy) at temperature 0."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if params.temperature == 0:
        return LogitsProcessorList()
    procs = [TemperatureLogitsWarper(params.temperature)]
    if params.top_p < 1:
        procs.append(TopPLogitsWarper(params.top_p))
    procs.append(_GumbelNoise(row_seeds, device))
    return LogitsProcessorList(procs)


class _GumbelNoise:
    """Adds Gumbel(0, 1) noise to each row's scores from that row's own generator."""

    def __init__(self, row_seeds: list[int], device):
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]

    def __call__(self, input_ids, scores):
        import torch

        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, device=scores.device)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return scores.float() + gumbel


class _StopStrings:
    """Stopping criterion: a row is done once its generated text holds a stop string.

    Records, per row, how many tokens had been generated at the first hit."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.prompt_width = tokenizer, stop, prompt_width
        self.hit_length: dict[int, int] = {}

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        gen = input_ids[:, self.prompt_width :]
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        done = []
        for row, text in enumerate(texts):
            hit = row in self.hit_length or any(s in text for s in self.stop)
            if hit:
                self.hit_length.setdefault(row, gen.shape[1])
            done.append(hit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
