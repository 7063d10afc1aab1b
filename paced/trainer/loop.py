"""The training loop: teacher and student from transformers, weighted distillation losses, AdamW.

`train(config, remeasure=None, evaluate=None) -> summary` runs the stages of `config.schedule`
one after another. Each stage has its own AdamW and its own warmup + cosine schedule over its
steps; the data stream goes on where the previous stage left it (unless a re-measurement made a
new source). Pass-rate re-measurements (`--refresh-every`, `--refresh-between-stages`) and evals
(`--eval-every`) run between steps through the hooks handed in: `paced/trainer/remeasure.py`.

One optimizer step = `grad_accum` micro-batches of `batch_size` problems per process. A
micro-batch whose rows all weigh 0 (on every process) is skipped before any forward pass and
counted; a process whose own batch weighs 0 while another's does not backpropagates a zero
loss, so every process runs the same collective operations (DDP). Off-policy stages train on
the shard's reference completion (rows without one are skipped and counted); on-policy stages
sample one completion per prompt from the current student (seed derived from the run seed,
step, rank and row, so a resume draws the same samples) — or, with --group-size K, K graded
samples per prompt weighted by w(p̂) of their group (paced/trainer/group.py). Both sides see
prompt tokens, then the completion and EOS; the loss covers completion + EOS tokens, aligned
between the two sides even when the teacher sees a different prompt (`--teacher-prompt-template`).

Multi-process: run under `torchrun`; gloo on CPU, nccl on GPU; rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from paced.errors import InputError
from paced.trainer import checkpoint as ckpt
from paced.trainer import sharding
from paced.trainer.checkpoint import Progress, save
from paced.trainer.config import RESUMABLE_CHANGES, Stage, TrainConfig
from paced.trainer.data import Batch, BatchStream, Position, open_stream
from paced.trainer.group import GroupIO, GroupStep
from paced.trainer.remeasure import (
    EVERY,
    GROUP,
    STAGE,
    Evaluate,
    OnStep,
    Remeasure,
    after_step,
    check_setup,
    group_snapshot_due,
    remeasure,
    remeasure_due,
)
from paced.trainer.report import Reporter, update_lr
from paced.trainer.tokens import Encoded, completion_ids, encode_side, fit_lengths, prompt_ids

if TYPE_CHECKING:
    import torch
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler
    from tqdm import tqdm
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

    from paced.trainer.losses import BatchLoss

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- runtime: processes, device


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    distributed: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any process."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def start_runtime(config: TrainConfig) -> Runtime:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world == 1:
        return Runtime(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device, True)


# ---------------------------------------------------------------- optimizer and schedule


class WarmupCosine:
    """Learning-rate factor: linear warmup to 1, then cosine down to `min_ratio` at `total`."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   steps: int) -> tuple[Optimizer, LRScheduler]:
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, steps, config.min_lr_ratio))
    return optimizer, schedule


# ---------------------------------------------------------------- one micro-batch


@dataclass
class Trainee:
    """What a micro-batch needs: the models (student possibly DDP-wrapped), tokenizer, runtime;
    and the hooks that measure between steps."""

    config: TrainConfig
    runtime: Runtime
    tokenizer: Tokenizer
    student: torch.nn.Module  # DDP- or FSDP-wrapped when distributed
    raw_student: PreTrainedModel
    teacher: PreTrainedModel
    remeasure: Remeasure | None = None
    evaluate: Evaluate | None = None
    group_io: GroupIO | None = None  # --group-size: grading and the sample sink (paced/trainer/group.py)
    reporter: Reporter | None = None  # --report-to: the training logs (paced/trainer/report.py)

    def settings(self) -> dict:
        """What trainer_state.json records as the run's config: the trainer's and its hooks'."""
        return run_settings(self.config, self.remeasure, self.evaluate)


def run_settings(config: TrainConfig, remeasure: Remeasure | None, evaluate: Evaluate | None) -> dict:
    hooks = [h.to_json() for h in (remeasure, evaluate) if h is not None]
    return config.to_json() | {k: v for hook in hooks for k, v in hook.items()}


def sample_targets(trainee: Trainee, prompts: list[str], seed_key: str) -> list[list[int]]:
    """One completion per prompt from the current student (token ids, EOS included if it ended)."""
    from paced.backends.base import SamplingConfig, derive_seed
    from paced.backends.hf_backend import HFBackend

    config = trainee.config
    params = SamplingConfig(n=1, temperature=config.sample_temperature, top_p=config.sample_top_p,
                            max_new_tokens=config.max_new_tokens, seed=config.seed,
                            chat_template=config.chat_template)
    seeds = [derive_seed(config.seed, f"{seed_key}:{i}") for i in range(len(prompts))]
    backend = HFBackend.from_model(trainee.raw_student, trainee.tokenizer, batch_size=max(1, len(prompts)))
    with trainee.runtime.autocast():
        samples = backend.generate(prompts, params, seeds=seeds)
    targets = []
    for (done,) in samples:
        ids = list(done.token_ids) if done.token_ids is not None else \
            completion_ids(trainee.tokenizer, [done.text])[0]
        targets.append(ids or [trainee.tokenizer.eos_token_id])
    return targets


def aligned_logits(model: torch.nn.Module, side: Encoded, vocab: int) -> torch.Tensor:
    """Logits predicting each completion token, lined up: [B, L, vocab]. Where the model takes
    `logits_to_keep`, only positions from the first completion token on get logits at all."""
    import inspect

    import torch

    forward = getattr(model, "module", model).forward
    lo, kwargs = 0, {}
    if "logits_to_keep" in inspect.signature(forward).parameters:
        lo = int(side.index[side.mask].min())
        kwargs["logits_to_keep"] = torch.arange(lo, int(side.index.max()) + 1, device=side.index.device)
    out = model(input_ids=side.input_ids, attention_mask=side.attention_mask, use_cache=False, **kwargs)
    index = (side.index - lo).clamp_min(0).unsqueeze(-1).expand(-1, -1, vocab)
    return out.logits[..., :vocab].gather(1, index)


def encode_pair(trainee: Trainee, prompts: list[str], answers: list[str | None],
                targets: list[list[int]]) -> list[Encoded]:
    """The student's side, then (with --teacher-prompt-template) the teacher's, on the device."""
    config, device, tokenizer = trainee.config, trainee.runtime.device, trainee.tokenizer
    sides = [prompt_ids(tokenizer, prompts, chat_template=config.chat_template)]
    if config.teacher_prompt_template:
        sides.append(prompt_ids(tokenizer, prompts, config.teacher_prompt_template, config.chat_template,
                                answers))
    sides, targets = fit_lengths(sides, targets, config.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_side(p, targets, pad) for p in sides]
    return [Encoded(*(x.to(device) for x in (e.input_ids, e.attention_mask, e.index, e.mask)))
            for e in encoded]


def forward_pair(trainee: Trainee, prompts: list[str], answers: list[str | None],
                 targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits, mask) over the completion tokens `targets`: the student
    sees each prompt, the teacher the same or `--teacher-prompt-template` (which may show the
    row's answer, `answers`); the teacher's forward runs without gradient."""
    import torch

    encoded = encode_pair(trainee, prompts, answers, targets)
    vocab = min(trainee.raw_student.config.vocab_size, trainee.teacher.config.vocab_size)
    with trainee.runtime.autocast():
        with torch.no_grad():
            teacher_logits = aligned_logits(trainee.teacher, encoded[-1], vocab)
        student_logits = aligned_logits(trainee.student, encoded[0], vocab)
    return student_logits, teacher_logits, encoded[0].mask


def micro_batch_loss(trainee: Trainee, batch: Batch, stage: Stage, on_policy: bool,
                     seed_key: str) -> tuple[BatchLoss | None, int, torch.Tensor]:
    """(BatchLoss or None, completion tokens, the tensor to backpropagate) of one micro-batch.

    A batch without weight (another process has some) gives a zero loss over the student's
    logits, so DDP's gradient all-reduce still happens on this process. The default --loss-path
    fused computes the loss from hidden states and heads instead (`paced.trainer.fused`)."""
    from paced.trainer import fused
    from paced.trainer.losses import weighted_batch_loss

    config, student, teacher = trainee.config, trainee.raw_student, trainee.teacher
    prompts, answers, weights = batch.prompts, batch.column("answer"), batch.weights.tolist()
    targets = sample_targets(trainee, prompts, seed_key) if on_policy else \
        completion_ids(trainee.tokenizer, batch.completions)
    heads = fused.head_of(student) is not None and fused.head_of(teacher) is not None
    if config.loss_path == "fused" and heads:
        vocab = min(student.config.vocab_size, teacher.config.vocab_size)
        encoded = encode_pair(trainee, prompts, answers, targets)
        return fused.fused_micro_batch(trainee, encoded, weights, stage.loss, vocab)
    student_logits, teacher_logits, mask = forward_pair(trainee, prompts, answers, targets)
    if not any(w > 0 for w in weights):  # another process has weight: join its all-reduce
        return None, 0, student_logits.sum() * 0.0
    with trainee.runtime.autocast():
        result = weighted_batch_loss(student_logits, teacher_logits, mask, weights, loss=stage.loss,
                                     chunk_size=config.loss_chunk_size, in_place=config.loss_in_place,
                                     **config.loss_kwargs(stage.loss))
    return result, int(mask.sum()), result.loss


# ---------------------------------------------------------------- steps and stages


@dataclass
class Meter:
    """Progress-bar statistics since the last display."""

    loss: float = 0.0
    batches: int = 0
    tokens: int = 0
    rows: int = 0
    zero_rows: int = 0
    weight: float = 0.0
    weight_sq: float = 0.0  # Σ w²: the effective sample size of the training logs
    started: float = field(default_factory=time.perf_counter)

    def add_batch(self, batch: Batch) -> None:
        weights = batch.weights
        self.rows += len(weights)
        self.zero_rows += int((weights == 0).sum())
        self.weight += float(weights.sum())
        self.weight_sq += float((weights * weights).sum())

    def merge(self, other: Meter) -> None:
        """Add one step's statistics (`other`) to these."""
        for name in ("loss", "batches", "tokens", "rows", "zero_rows", "weight", "weight_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def postfix(self) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {"loss": f"{self.loss / max(self.batches, 1):.4f}", "tok/s": f"{self.tokens / seconds:.0f}",
                "w_mean": f"{self.weight / max(self.rows, 1):.3f}",
                "w0": f"{self.zero_rows / max(self.rows, 1):.2f}"}


def train_step(trainee: Trainee, stream: BatchStream, stage: Stage, on_policy: bool,
               optimizer: Optimizer, schedule: LRScheduler,
               progress: Progress, meter: Meter, acks: list[str]) -> bool:
    """One optimizer step over `grad_accum` micro-batches; False when the data ran out first."""
    config = trainee.config
    optimizer.zero_grad(set_to_none=True)
    micro, losses = 0, []
    # --group-size: K graded samples per prompt (paced/trainer/group.py)
    group = GroupStep(trainee, progress.step) if config.group_size and on_policy else None
    while micro < config.grad_accum:
        batch = stream.next_batch()
        if trainee.runtime.any(batch is None):
            break
        if trainee.runtime.any(batch.wait_seconds is not None):  # some process has no rows right now
            if batch.wait_seconds is None:
                stream.push_back(batch)
            if micro > 0:
                break  # step on what is there; its acks may free the shards the service holds back
            for key in acks:  # only zero-weight batches so far: nothing to train, ack them now
                stream.source.ack(key)
            acks.clear()
            time.sleep(batch.wait_seconds or 0.0)
            continue
        acks.extend(batch.done_keys)
        meter.add_batch(batch)
        if not trainee.runtime.any(bool((batch.weights > 0).any())):
            progress.skipped_batches += 1 if len(batch) else 0  # nothing to learn anywhere: no forward
            continue
        if group is not None:  # K samples per prompt, graded; the update waits for the whole step
            group.add(batch)
            micro += 1
            continue
        result, tokens, loss = micro_batch_loss(trainee, batch, stage, on_policy,
                                                f"{progress.step}:{trainee.runtime.rank}:{micro}")
        (loss / config.grad_accum).backward()
        micro += 1
        progress.local_tokens += tokens
        meter.tokens += tokens
        if on_policy:  # every trained token of a one-sample on-policy batch was generated first
            progress.generated_tokens += int(trainee.runtime.sum([float(tokens)])[0])
        if result is not None:
            losses.append(float(result.loss.detach()))
    if micro == 0:
        return False
    if group is not None:
        if group.finish(stage, optimizer, schedule, progress):
            meter.loss, meter.batches = meter.loss + progress.last_loss, meter.batches + 1
        return True
    if losses:
        meter.loss, meter.batches = meter.loss + sum(losses), meter.batches + len(losses)
    apply_update(trainee, optimizer, schedule, progress, losses)
    return True


def apply_update(trainee: Trainee, optimizer: Optimizer, schedule: LRScheduler,
                 progress: Progress, losses: list[float]) -> None:
    """The end of every optimizer step (plain and group): record the step's mean loss, clip the
    gradient norm, step the optimizer and the schedule."""
    import torch

    if losses:
        progress.last_loss = sum(losses) / len(losses)
        progress.first_loss = progress.last_loss if progress.first_loss is None else progress.first_loss
    if trainee.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainee.student.parameters(), trainee.config.max_grad_norm)
    optimizer.step()
    schedule.step()


def run_stage(trainee: Trainee, stream: BatchStream, index: int, progress: Progress, bar: tqdm,
              optimizer_state: dict | None, on_step: OnStep | None = None) -> BatchStream:
    """Steps of stage `index` from `progress.stage_step` to the stage's end (or the data's), with
    the evals and --refresh-every re-measurements due after each; returns the stream to go on with."""
    config = trainee.config
    stage = config.schedule[index]
    on_policy = stage.resolved_on_policy(config.on_policy)
    optimizer, schedule = make_optimizer(trainee.student, config, stage.steps)
    if optimizer_state is not None:
        sharding.load_optimizer_state(trainee, optimizer, optimizer_state["optimizer"])
        schedule.load_state_dict(optimizer_state["scheduler"])
    meter, acks = Meter(), []
    while progress.stage_step < stage.steps:
        stream.need_completion = not on_policy
        started, step_meter = time.perf_counter(), Meter()
        stepped = train_step(trainee, stream, stage, on_policy, optimizer, schedule, progress, step_meter,
                             acks)
        for key in acks:  # after the step (or at the end of the data: those rows are consumed)
            stream.source.ack(key)
        acks.clear()
        seconds = time.perf_counter() - started
        progress.seconds += seconds
        if not stepped:
            progress.data_exhausted = True
            return stream
        progress.step += 1
        progress.stage_step += 1
        progress.stage_steps[index] += 1
        meter.merge(step_meter)
        trainee.reporter.step(trainee.runtime, progress, step_meter, update_lr(schedule), seconds)
        bar.update(1)
        if progress.step % 5 == 0 or progress.stage_step == stage.steps:
            bar.set_postfix(stage=f"{index}:{stage.loss}", **meter.postfix(), refresh=False)
            meter = Meter()
        after_step(trainee, progress, stream, on_step)
        stage_end = progress.stage_step == stage.steps
        if remeasure_due(config, progress.step, stage_end):
            stream = remeasure(trainee, progress, stream, EVERY, optimizer, schedule)
        elif group_snapshot_due(config, progress.step, stage_end, bool(config.group_size and on_policy)):
            stream = remeasure(trainee, progress, stream, GROUP, optimizer, schedule)
        elif config.save_every and progress.step % config.save_every == 0 \
                and progress.step < config.total_steps:
            save(trainee, progress, f"checkpoint-{progress.step}", stream, optimizer, schedule)
    return stream


# ---------------------------------------------------------------- the run


def train(config: TrainConfig, remeasure: Remeasure | None = None, evaluate: Evaluate | None = None,
          on_step: OnStep | None = None, group_io: GroupIO | None = None) -> dict:
    """Run every stage of `config.schedule`; returns the summary (also in OUT/final).

    `remeasure` re-measures pass rates (needed by --refresh-every and --refresh-between-stages;
    it may also pick the starting source), `evaluate` the held-out accuracy (--eval-every):
    `paced.jobs.remeasure` has both. `on_step(step, model, tokenizer)`, if given, is called at
    step 0 and after every optimizer step with the in-memory student (the Python API's hook,
    e.g. for a bench's own evals). `group_io`: grading and the sample sink of --group-size
    (paced/trainer/group.py; `paced.jobs.group_rollouts` has both)."""
    measures = config.refresh_every or config.refresh_between_stages or config.group_snapshot_every
    if measures and remeasure is None:
        raise InputError("--refresh-every, --refresh-between-stages and --group-snapshot-every need a "
                         "remeasure job (train(config, remeasure=RemeasureJob(...)); `paced train` "
                         "gives one)")
    if config.eval_every and evaluate is None:
        raise InputError("--eval-every needs an evaluate job (train(config, evaluate=HeldOutEval(...)))")
    if config.group_size and group_io is None:
        raise InputError("--group-size grades the student's samples: pass group_io (`paced train` wires it)")
    runtime = start_runtime(config)
    try:
        return _train(config, runtime, remeasure, evaluate, on_step, group_io)
    finally:
        if runtime.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime, remeasure_job: Remeasure | None, evaluate: Evaluate | None,
           on_step: OnStep | None, group_io: GroupIO | None = None) -> dict:
    import torch
    from tqdm import tqdm

    resume_from = ckpt.resume_point(config, run_settings(config, remeasure_job, evaluate), RESUMABLE_CHANGES)
    state = ckpt.read_state(resume_from) if resume_from else None
    if state and state.get("finished"):
        return state["summary"]
    torch.manual_seed(config.seed)
    start = resume_from or Path(config.student)
    tokenizer, student, teacher = ckpt.load_models(config, start, runtime.device)
    model = sharding.wrap_models(student, teacher, config, runtime)
    progress = Progress.from_state(state, len(config.schedule), config.source)
    resumed_at = progress.step if state else None
    reporter = Reporter(Path(config.out), config.report_to, runtime.rank, resumed_at, progress)
    trainee = Trainee(config, runtime, tokenizer, model, student, teacher, remeasure_job, evaluate, group_io,
                      reporter)
    optimizer_state = None
    if state:
        ckpt.restore_rng_state(state["rng"])
        optimizer_state = ckpt.load_optimizer_state(resume_from) if progress.stage_step > 0 else None
    check_setup(trainee, progress)
    if state is None and remeasure_job is not None:
        progress.source = remeasure_job.starting_source(progress.source, Path(config.out))
    position = Position.from_json(state.get("position")) if state else None
    stream = open_stream(config, runtime.rank, runtime.world_size, progress.source, position)
    if progress.pending is not None:  # killed during a re-measurement: finish it first
        stream = remeasure(trainee, progress, stream, progress.pending.kind)
    after_step(trainee, progress, stream, on_step if progress.step == 0 else None)
    bar = tqdm(total=config.total_steps, initial=progress.step, unit="step", desc="train", file=sys.stderr,
               disable=not config.progress or runtime.rank != 0, dynamic_ncols=True)
    with bar, contextlib.closing(reporter):
        for index in range(progress.stage, len(config.schedule)):
            stream = run_stage(trainee, stream, index, progress, bar, optimizer_state, on_step)
            optimizer_state = None
            if progress.data_exhausted or index + 1 == len(config.schedule):
                break
            if config.refresh_between_stages:
                stream = remeasure(trainee, progress, stream, STAGE)
            else:
                progress.stage, progress.stage_step = index + 1, 0
    checksums = parameter_checksums(trainee) if runtime.distributed else None
    summary = ckpt.make_summary(trainee, progress, stream, checksums)
    save(trainee, progress, ckpt.FINAL, stream, extra={"finished": True, "summary": summary})
    stream.source.close()
    return summary


def parameter_checksums(trainee: Trainee) -> list[list[float]]:
    """[sum, sum of squares] of the student's parameters on every process: equal when in sync."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        flat = [p.detach().double() for p in sharding.full_parameters(trainee.raw_student)]
        mine = torch.tensor([sum(float(p.sum()) for p in flat), sum(float((p * p).sum()) for p in flat)],
                            dtype=torch.float64, device=trainee.runtime.device)
    gathered = [torch.zeros_like(mine) for _ in range(trainee.runtime.world_size)]
    dist.all_gather(gathered, mine)
    return [g.tolist() for g in gathered]
