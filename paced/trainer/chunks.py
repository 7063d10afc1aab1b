"""How many tokens one loss chunk holds: from the vocabulary and the memory the device has free.

A chunk of `n` tokens costs about `n * vocab * bytes_per_entry` bytes of temporaries (the
float32 logits of both models, their log-softmaxes, the probabilities and the gradient the row
functions of `losses.py` build; `fused.py` adds the head's matmul outputs). On an accelerator
the chunk takes a share of the memory free right now (`torch.cuda.mem_get_info`), capped, so a
big GPU gets chunks of hundreds of tokens instead of a constant sized for the CPU; on the CPU a
fixed number of entries measured near the fastest (bench/kl_loss.py --chunk-size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# CPU: 2^21 float32 entries per [chunk, vocab] tensor (8 MiB; a chunk holds a few) measured near
# the fastest: smaller chunks cost time, larger ones memory.
CHUNK_ENTRIES_CPU = 2**21
# Accelerators: this share of the free memory, at most a cap, goes to one chunk's temporaries.
# Beyond a few hundred tokens a chunk stops getting faster on a GPU (the matmuls are already
# large; issue 17's table: 512 -> 2048 tokens saved 8 % on the logits path). The fused path's
# cap is lower: its point is memory (goal: 1 GiB above the inputs at 8192 x 151,936, bf16,
# grad_W included), and Liger-Kernel's fused linear JSD uses ~64-token chunks there.
# bench/gpu/run.sh sweeps chunk sizes on a GPU to check these.
FREE_SHARE = 0.25
CHUNK_BYTES_CAP = 2**30
CHUNK_BYTES_CAP_FUSED = 2**29
# Bytes of temporaries per [token, vocab] entry, counted from the code: the logits path holds
# about six float32 [n, V] tensors at once (two logits, two log-softmaxes, p, log-ratio/grad);
# the fused path adds the two head outputs in the compute dtype and the gradient's cast.
BYTES_PER_ENTRY_LOGITS = 24
BYTES_PER_ENTRY_FUSED = 32


def compute_chunk_tokens(vocab: int, free_bytes: int | None, bytes_per_entry: int,
                         cap: int = CHUNK_BYTES_CAP) -> int:
    """Tokens per chunk: CHUNK_ENTRIES_CPU entries without a free-memory figure (the CPU), else
    FREE_SHARE of `free_bytes` (at most `cap` bytes) over `vocab * bytes_per_entry`; >= 1."""
    if free_bytes is None:
        return max(1, CHUNK_ENTRIES_CPU // vocab)
    budget = min(int(free_bytes * FREE_SHARE), cap)
    return max(1, budget // (vocab * bytes_per_entry))


def free_device_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device in bytes, None for the CPU (and other devices)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def auto_chunk_tokens(vocab: int, device: torch.device | str, bytes_per_entry: int,
                      cap: int = CHUNK_BYTES_CAP) -> int:
    """The chunk for `vocab` on `device` now (see the module docstring)."""
    return compute_chunk_tokens(vocab, free_device_bytes(device), bytes_per_entry, cap)
