"""Measuring while training: when to re-measure pass rates and evaluate, and the collective part.

The work itself is handed in (`train(config, remeasure=..., evaluate=...)`; `paced train` gives
`paced/jobs/remeasure.py`'s jobs). A re-measurement at step N (every process takes part):

1. save OUT/checkpoint-N with `pending_refresh` in its trainer_state.json (the normal checkpoint:
   a kill from here on resumes at step N and first finishes this re-measurement);
2. on rank 0, call the `Remeasure` hook with the saved checkpoint; it rolls the checkpoint out,
   writes the lineage's next snapshot and answers with its record and the data source to go on
   with; every process gets the record;
3. put the global RNG state back (so the training that follows is unchanged), open the new source;
4. rewrite checkpoint-N's trainer_state.json: the re-measurement recorded, no longer pending, the
   new source (weights, optimizer and RNG state as saved in 1).

Resume calls the hook again for a pending re-measurement: the hook's steps are idempotent.

`--group-snapshot-every N` (kind GROUP) goes the same way with no rollout: in 2 the hook's
`from_samples` is handed the steps whose training samples were committed since the last
re-measurement (each with its sampling) and writes the lineage's next snapshot from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from paced.trainer import checkpoint as ckpt
from paced.trainer.data import BatchStream, open_stream
from paced.trainer.flops import flops_record
from paced.trainer.records import EVERY, GROUP, STAGE, EvalPoint, PendingRemeasure, RemeasureRecord

if TYPE_CHECKING:
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from paced.trainer.config import TrainConfig
    from paced.trainer.loop import Runtime, Trainee

OnStep = Callable[[int, Any, Any], None]  # (step, in-memory student, tokenizer)
__all__ = ["EVERY", "GROUP", "STAGE", "Evaluate", "OnStep", "Remeasure", "after_step", "check_setup",
           "group_snapshot_due", "remeasure", "remeasure_due"]


class Remeasure(Protocol):
    """Re-measures a saved checkpoint's pass rates and says where the data comes from next."""

    def to_json(self) -> dict:
        """Its settings, recorded beside the trainer's (a --resume must not change them)."""

    def check(self, source: str, previous: dict | None, every: bool) -> None:
        """Raise before training when a later call could not run (`every`: --refresh-every)."""

    def starting_source(self, source: str, out: Path) -> str:
        """The source to train on from step 0 (e.g. `source` rebuilt with other weights)."""

    def __call__(self, checkpoint_dir: Path, step: int, kind: str, source: str, *, stage: int, round_: int,
                 previous: dict | None, student: Any, tokenizer: Any, runtime: Any) -> dict:
        """The record of one re-measurement (kind EVERY or STAGE), with the next `source`: the
        JSON form of `RemeasureRecord` (`previous` too), since the jobs below the trainer
        cannot import its types."""

    def from_samples(self, checkpoint_dir: Path, step: int, source: str, *, samples: list, round_: int,
                     previous: dict | None) -> dict:
        """The record of a GROUP snapshot: the lineage's next snapshot from the training samples
        of `samples` ([(step, SamplingConfig)], oldest first), with the next `source`."""


class Evaluate(Protocol):
    """Held-out accuracy of the in-memory student."""

    def to_json(self) -> dict: ...

    def check(self) -> None: ...

    def __call__(self, step: int, student: Any, tokenizer: Any, runtime: Any) -> dict: ...


def remeasure_due(config: TrainConfig, step: int, stage_end: bool) -> bool:
    """A --refresh-every re-measurement after optimizer step `step` (never after the last step;
    at a stage's end --refresh-between-stages does it)."""
    return bool(config.refresh_every) and step % config.refresh_every == 0 and step < config.total_steps \
        and not (stage_end and config.refresh_between_stages)


def group_snapshot_due(config: TrainConfig, step: int, stage_end: bool, group_stage: bool) -> bool:
    """A --group-snapshot-every snapshot after optimizer step `step` of a group stage (never after
    the last step; at a stage's end --refresh-between-stages measures instead)."""
    return bool(config.group_snapshot_every) and group_stage and step % config.group_snapshot_every == 0 \
        and step < config.total_steps and not (stage_end and config.refresh_between_stages)


def on_rank0(runtime: Runtime, work: Callable[[], Any]) -> Any:
    """`work()` on rank 0, its result broadcast to every process."""
    result = [work()] if runtime.rank == 0 else [None]
    if runtime.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(result, src=0)
    return result[0]


def check_setup(trainee: Trainee, progress: ckpt.Progress) -> None:
    """Fail before training when a re-measurement or eval could not run later."""
    config = trainee.config
    if config.refresh_every or config.refresh_between_stages or config.group_snapshot_every:
        previous = progress.remeasures[-1].to_json() if progress.remeasures else None
        trainee.remeasure.check(progress.source, previous,
                                bool(config.refresh_every or config.group_snapshot_every))
    if config.eval_every:
        trainee.evaluate.check()


def remeasure(trainee: Trainee, progress: ckpt.Progress, stream: BatchStream, kind: str,
              optimizer: Optimizer | None = None, schedule: LRScheduler | None = None) -> BatchStream:
    """Steps 1–4 of the module doc (collective); returns the stream to go on with."""
    name, started = f"checkpoint-{progress.step}", time.perf_counter()
    if hasattr(stream.source, "renew"):  # service leases held mid-shard: keep them through it
        stream.source.renew()
    if progress.pending is None:
        progress.pending = PendingRemeasure(kind, progress.step, progress.stage, len(progress.remeasures) + 1)
        ckpt.save(trainee, progress, name, stream, optimizer, schedule)
    pending = progress.pending
    rng = ckpt.capture_rng_state()
    previous = progress.remeasures[-1].to_json() if progress.remeasures else None
    answer = on_rank0(trainee.runtime, lambda: call_hook(trainee, progress.source, name, pending, previous))
    ckpt.restore_rng_state(rng)
    record = RemeasureRecord.from_json({**answer, "refresh_seconds": round(time.perf_counter() - started, 3)})
    progress.pending = None
    progress.remeasures.append(record)
    if trainee.reporter is not None:
        trainee.reporter.refresh(pending.step, record.to_json())
    if pending.kind == STAGE:
        progress.stage, progress.stage_step = pending.stage + 1, 0
    if record.source != progress.source:
        progress.local_rows += stream.skipped_rows
        stream.source.close()
        progress.source = record.source
        stream = open_stream(trainee.config, trainee.runtime.rank, trainee.runtime.world_size,
                             progress.source)
    ckpt.rewrite_state(trainee, progress, name, stream)
    return stream


def call_hook(trainee: Trainee, source: str, name: str, pending: PendingRemeasure,
              previous: dict | None) -> dict:
    """Step 2 on rank 0: the hook's record of the pending re-measurement."""
    hook, folder = trainee.remeasure, Path(trainee.config.out) / name
    if pending.kind == GROUP:  # the samples of steps since the last re-measurement (of this run)
        from paced.trainer.group import step_sampling

        first = previous["step"] if previous else 0
        samples = [(s, step_sampling(trainee.config, s)) for s in range(first, pending.step)]
        return hook.from_samples(folder, pending.step, source, samples=samples, round_=pending.round,
                                 previous=previous)
    return hook(folder, pending.step, pending.kind, source, stage=pending.stage, round_=pending.round,
                previous=previous, student=trainee.raw_student, tokenizer=trainee.tokenizer,
                runtime=trainee.runtime)


def after_step(trainee: Trainee, progress: ckpt.Progress, stream: BatchStream,
               on_step: OnStep | None = None) -> None:
    """The `on_step` callback, then (every --eval-every steps, once per step) held-out accuracy
    with the cumulative training, generated and rollout tokens and FLOPs (collective)."""
    if on_step is not None:
        on_step(progress.step, trainee.raw_student, trainee.tokenizer)
    every = trainee.config.eval_every
    if not every or progress.step % every or any(e.step == progress.step for e in progress.evals):
        return
    train_tokens, _ = progress.totals(trainee.runtime, stream)
    rng, started = ckpt.capture_rng_state(), time.perf_counter()
    entry = on_rank0(trainee.runtime, lambda: trainee.evaluate(progress.step, trainee.raw_student,
                                                               trainee.tokenizer, trainee.runtime))
    ckpt.restore_rng_state(rng)
    rollout_tokens = progress.rollout_tokens
    flops = flops_record(trainee, train_tokens, progress.generated_tokens, rollout_tokens)["total_flops"]
    point = EvalPoint.from_json({**entry, "train_tokens": train_tokens, "rollout_tokens": rollout_tokens,
                                 "flops": flops, "generated_tokens": progress.generated_tokens,
                                 "train_seconds": round(progress.seconds, 3),
                                 "seconds": round(time.perf_counter() - started, 3)})
    progress.evals.append(point)
    if trainee.reporter is not None:
        trainee.reporter.eval(progress.step, point.to_json())
