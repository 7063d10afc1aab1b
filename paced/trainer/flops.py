"""Compute in FLOPs: what a generated and a trained token cost (DESIGN.md §8; issue 12).

With N the parameter count (all parameters, embeddings included: on the built-in task's tiny
models they are a large share, and leaving them out would flatter the generation-heavy arms):

- a generated token (sampling, rollouts) ≈ 2·N_student (one forward);
- a trained token ≈ 6·N_student (forward + backward) + 2·N_teacher (the teacher's forward).

"At equal compute" means at equal FLOPs: a generated token no longer counts like a trained one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from paced.trainer.loop import Trainee


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of a torch module (a DDP wrapper's inner module counts the same)."""
    return int(sum(p.numel() for p in getattr(model, "module", model).parameters()))


def compute_flops(n_student: int, n_teacher: int, trained_tokens: int, generated_tokens: int) -> float:
    """2·N_s per generated token + (6·N_s + 2·N_t) per trained token."""
    return 2.0 * n_student * generated_tokens + (6.0 * n_student + 2.0 * n_teacher) * trained_tokens


def flops_record(trainee: Trainee, train_tokens: int, generated_tokens: int, rollout_tokens: int) -> dict:
    """The FLOPs fields of the summary and of an eval-curve entry, for `trainee`."""
    n_s, n_t = count_parameters(trainee.raw_student), count_parameters(trainee.teacher)
    train = compute_flops(n_s, n_t, train_tokens, 0)
    sampling = compute_flops(n_s, n_t, 0, generated_tokens)
    rollouts = compute_flops(n_s, n_t, 0, rollout_tokens)
    return {"generated_tokens": generated_tokens, "train_flops": train, "sampling_flops": sampling,
            "rollout_flops": rollouts, "total_flops": train + sampling + rollouts}
