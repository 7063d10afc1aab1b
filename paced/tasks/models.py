"""Tokenizer and tiny Llama models for the built-in task, built locally (no hub).

The tokenizer is character level (`tokenizers` WordLevel over the task's alphabet, a `Fuse`
decoder, left padding). Models are Llama configs with head dimension 32, which vLLM's CPU
attention supports, so the vLLM backend serves the same models as transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paced.tasks.arithmetic import ALPHABET

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]


@dataclass(frozen=True)
class ModelSize:
    """Shape of a tiny Llama. `hidden_size / num_heads` must be 32 or 64 (vLLM CPU attention)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 64


def build_tokenizer(alphabet: str = ALPHABET):
    """A character-level fast tokenizer: one token per character, BOS prepended, left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=256,
    )
    return tok


def init_model(tokenizer, size: ModelSize = ModelSize(), seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size, num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads, num_key_value_heads=size.num_heads,
        head_dim=size.hidden_size // size.num_heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, out_dir: Path) -> Path:
    """`save_pretrained` both into `out_dir` (safetensors), with a generation config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_random_model(out_dir: Path, size: ModelSize = ModelSize(), seed: int = 0) -> Path:
    """Tokenizer + random-init tiny Llama saved to `out_dir`: the fixture tests build on."""
    tokenizer = build_tokenizer()
    return save_model(init_model(tokenizer, size, seed), tokenizer, out_dir)
