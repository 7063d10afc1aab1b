"""How a batch's text becomes the token tensors of both sides (student and teacher).

Prompts keep the tokenizer's special tokens (as generation sees them); reference completions
end with EOS; `fit_lengths` cuts targets on the right and prompts on the left to fit
`max_length`; `encode_side` right-pads and records which logits predict each target token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from paced.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase as Tokenizer


@dataclass(frozen=True)
class Encoded:
    """One side (student or teacher) of a batch, right padded.

    `index[b, j]` is the position whose logits predict completion token j of row b, so
    `logits.gather(1, index)` lines both sides up on the completion; `mask` marks real tokens."""

    input_ids: object  # torch.LongTensor [B, T]
    attention_mask: object  # [B, T]
    index: object  # [B, L]
    mask: object  # torch.BoolTensor [B, L]


def prompt_ids(tokenizer: Tokenizer, prompts: list[str], template: str | None = None,
               chat_template: bool = False, answers: list[str | None] | None = None) -> list[list[int]]:
    """Prompt tokens as generation sees them: with the tokenizer's special tokens (e.g. BOS),
    or (`chat_template`) as one user turn with the generation prompt, as the backends render
    them. `template` may show `{answer}` (the rows' reference answers, `answers`)."""
    from paced.backends.base import render_prompts

    if template and "{answer}" in template:
        answers = answers or [None] * len(prompts)
        if any(a is None for a in answers):
            raise InputError("--teacher-prompt-template shows {answer}, but some shard rows carry no "
                             "`answer`; rebuild the manifest with this version of paced")
        texts = [template.format(prompt=p, answer=a) for p, a in zip(prompts, answers, strict=True)]
    else:
        texts = [template.format(prompt=p) for p in prompts] if template else list(prompts)
    return render_prompts(tokenizer, texts, chat_template)


def completion_ids(tokenizer: Tokenizer, completions: list[str]) -> list[list[int]]:
    """Reference completions as training targets: their tokens and the EOS that ends them."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return [list(row) + ([eos] if eos is not None else []) for row in ids]


def fit_lengths(prompt_sides: list[list[list[int]]], targets: list[list[int]],
                max_length: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Cut targets (right) and prompts (left) so every side of every row fits `max_length`."""
    cut_targets = []
    for b, target in enumerate(targets):
        longest_prompt = max(len(side[b]) for side in prompt_sides)
        room = max_length - min(longest_prompt, max_length - 1)
        cut_targets.append(target[:room])
    cut_prompts = [[p[max(0, len(p) - (max_length - len(t))):]
                    for p, t in zip(side, cut_targets, strict=True)]
                   for side in prompt_sides]
    return cut_prompts, cut_targets


def encode_side(prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> Encoded:
    """Right-padded prompt + target ids and the logit positions of the target tokens."""
    import torch

    if any(len(p) == 0 for p in prompts):
        raise InputError("a prompt encodes to no tokens: the first completion token has no context "
                         "(use a tokenizer that adds BOS, or non-empty prompts)")
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    length = max(1, max(len(t) for t in targets))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    index = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for b, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        ids[b, : len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        attention[b, : len(p) + len(t)] = 1
        index[b, : len(t)] = torch.arange(len(p) - 1, len(p) - 1 + len(t))
        mask[b, : len(t)] = True
    return Encoded(ids, attention, index, mask)
