"""Per-problem distillation gradients, sketched: the measurement behind `paced diagnose`.

A gradient of every trainable parameter is far too large to keep per problem, so it is sketched:
a count sketch sends each parameter entry to one of D buckets with a random sign (fixed by the
seed), which keeps inner products — and so norms, SNRs and cosines — unbiased. Per problem: one
forward of student and teacher, the loss of that problem alone, one backward, one sketch.

Off-policy: forward KL on the teacher's reference completion (teacher-forced). On-policy: reverse
KL on one completion sampled from the student (T = 1). The held-out direction: the gradient of
the cross-entropy of the held-out problems' gold answers (what raises held-out accuracy).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from paced.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer
from paced.trainer.loop import aligned_logits
from paced.trainer.losses import LOSSES
from paced.trainer.tokens import completion_ids, encode_side, fit_lengths, prompt_ids


class GradientSketch:
    """Count sketch of the gradients of `model`'s trainable parameters whose names match
    `pattern` (all when None) to `dim` numbers."""

    def __init__(self, model: torch.nn.Module, dim: int, seed: int, pattern: str | None = None):
        if dim < 2:
            raise InputError(f"the sketch dimension must be >= 2, got {dim}")
        rule = re.compile(pattern) if pattern else None
        self.params = [p for name, p in model.named_parameters() if p.requires_grad
                       and (rule is None or rule.search(name))]
        if not self.params:
            raise InputError(f"no trainable parameter matches {pattern!r}")
        gen = torch.Generator().manual_seed(seed)
        self.buckets = [torch.randint(0, dim, (p.numel(),), generator=gen) for p in self.params]
        self.signs = [torch.randint(0, 2, (p.numel(),), generator=gen).float() * 2 - 1 for p in self.params]
        self.dim = dim

    def __call__(self) -> np.ndarray:
        out = torch.zeros(self.dim, dtype=torch.float64)
        for p, bucket, sign in zip(self.params, self.buckets, self.signs, strict=True):
            if p.grad is not None:
                out.index_add_(0, bucket, (p.grad.detach().reshape(-1).cpu().double() * sign))
        return out.numpy()


def sample_completions(model: PreTrainedModel, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int,
                       seed: int) -> list[list[int]]:
    """One completion per prompt from `model` at T = 1 (token ids, EOS included if it ended)."""
    from paced.backends.base import SamplingConfig, derive_seed
    from paced.backends.hf_backend import HFBackend

    params = SamplingConfig(n=1, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    backend = HFBackend.from_model(model, tokenizer, batch_size=max(1, min(len(prompts), 64)))
    samples = backend.generate(prompts, params,
                               seeds=[derive_seed(seed, f"diagnose:{i}") for i in range(len(prompts))])
    out = []
    for (done,) in samples:
        ids = list(done.token_ids) if done.token_ids is not None else \
            completion_ids(tokenizer, [done.text])[0]
        out.append(ids or [tokenizer.eos_token_id])
    return out


def problem_gradients(student: PreTrainedModel, teacher: PreTrainedModel | None, tokenizer: Tokenizer,
                      prompts: list[str], targets: list[list[int]], loss: str, sketch: GradientSketch,
                      max_length: int = 1024) -> np.ndarray:
    """[problems, D]: the sketched gradient of each problem's own loss (`loss` in LOSSES, or
    "nll": the student's cross-entropy of the target, no teacher)."""
    if loss != "nll" and loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = student.config.vocab_size
    if teacher is not None:
        vocab = min(vocab, teacher.config.vocab_size)
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        sides, cut = fit_lengths([prompt_ids(tokenizer, [prompt])], [target], max_length)
        side = encode_side(sides[0], cut, pad)
        student.zero_grad(set_to_none=True)
        s_logits = aligned_logits(student, side, vocab)
        if loss == "nll":
            ids = torch.tensor(cut, dtype=torch.long)
            lp = torch.log_softmax(s_logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            value = -(lp * side.mask).sum() / side.mask.sum().clamp_min(1)
        else:
            with torch.no_grad():
                t_logits = aligned_logits(teacher, side, vocab)
            value = LOSSES[loss](s_logits, t_logits, side.mask)[0]
        value.backward()
        rows.append(sketch())
    student.zero_grad(set_to_none=True)
    return np.stack(rows) if rows else np.zeros((0, sketch.dim))
