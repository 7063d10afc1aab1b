"""How the student (and teacher) are spread over processes: DDP, or FSDP2 with `--fsdp`.

DDP keeps a whole student per process and all-reduces gradients. `--fsdp` uses torch's
`fully_shard` (FSDP2, torch.distributed.fsdp): every transformer block the model names in
`_no_split_modules` is its own shard group, then the whole model; each process holds 1/world of
the parameters, gradients and AdamW state and all-gathers a block's weights just before using
them. The teacher is sharded the same way (forward only, under no_grad): it costs one all-gather
per block per step and saves (world - 1)/world of its memory.

Checkpoints of an --fsdp run hold *gathered* state dicts: every process takes part in the
gather, rank 0 writes the full weights with `save_pretrained` (an ordinary model folder) and the
full optimizer state keyed by parameter name (`get_optimizer_state_dict(full_state_dict=True)`).
A resume loads the full weights into every process, shards them again and gives each process
its part of the optimizer state (`set_optimizer_state_dict`): any world size can resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paced.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch.optim import Optimizer

    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import Runtime, Trainee


def _fsdp_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def wrap_models(student: torch.nn.Module, teacher: torch.nn.Module, config: TrainConfig,
                runtime: Runtime) -> torch.nn.Module:
    """The student as the training step calls it: itself, DDP-wrapped, or sharded in place."""
    if config.fsdp:
        if not runtime.distributed:
            raise InputError("--fsdp needs several processes: run paced train under torchrun "
                             "(e.g. torchrun --nproc_per_node 2 -m paced.cli train ... --fsdp)")
        _shard(student)
        _shard(teacher)
        return student
    if not runtime.distributed:
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[runtime.device] if runtime.device != "cpu" else None)


def model_state(trainee: Trainee) -> dict | None:
    """The student's full weights when sharded (a collective: every process calls it), else None."""
    if not trainee.config.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(trainee.raw_student, options=_fsdp_options())
    # a tied parameter (e.g. lm_head.weight = embed_tokens.weight) once, as save_pretrained writes it
    kept = {name for name, _ in trainee.raw_student.named_parameters()}
    tied = {name for name, _ in trainee.raw_student.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in state.items() if k not in tied}


def optimizer_state(trainee: Trainee, optimizer: Optimizer) -> dict:
    """The optimizer state to save: full and keyed by parameter name under --fsdp (a collective)."""
    if not trainee.config.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(trainee.raw_student, optimizer, options=_fsdp_options())


def load_optimizer_state(trainee: Trainee, optimizer: Optimizer, state: dict) -> None:
    if not trainee.config.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(trainee.raw_student, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def full_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each parameter whole (gathered from its shards under FSDP: every process must call this)."""
    for p in model.parameters():
        yield p.full_tensor() if hasattr(p, "full_tensor") else p
