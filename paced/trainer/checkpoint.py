"""Model folders in and checkpoints out, which resume to the same result as an uninterrupted run.

A checkpoint is a folder `OUT/checkpoint-{step}` (or `OUT/final`) holding

- the student and its tokenizer (`save_pretrained`: loadable by any transformers code),
- `optimizer.pt`: AdamW and learning-rate scheduler state (`torch.save`),
- `trainer_state.json`, written last: the resolved config, paced version, step, stage and the
  step within it, the data source and position (files: epoch, shard index, row offset of the
  next unread row), the counters of the summary, and the RNG states (torch, numpy, python).

It is built under a temporary name in OUT and renamed into place, so a checkpoint folder is
either complete or absent. Data position over HTTP: nothing is stored; the lease a killed
trainer held is not acked, and the service hands it out again when its TTL expires.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from paced import __version__
from paced.errors import InputError
from paced.store.files import read_json, write_json_atomic
from paced.trainer.flops import flops_record
from paced.trainer.records import EvalPoint, PendingRemeasure, RemeasureRecord

if TYPE_CHECKING:
    import torch
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

    from paced.trainer.config import TrainConfig
    from paced.trainer.data import BatchStream
    from paced.trainer.loop import Runtime, Trainee

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
FINAL = "final"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- RNG states (JSON-able)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as plain JSON values."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------- model folders in


def load_model(path: str | Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Tokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"model folder not found or has no config.json: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load a causal LM from {path}: {err}") from err
    return model, tokenizer


def load_models(config: TrainConfig, student_path: Path,
                device: str) -> tuple[Tokenizer, PreTrainedModel, PreTrainedModel]:
    """Student (float32 weights, trainable) and teacher (frozen, eval, bf16 on GPU)."""
    import torch

    student, tokenizer = load_model(student_path, torch.float32, device)
    teacher_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    teacher, teacher_tokenizer = load_model(config.teacher, teacher_dtype, device)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(f"teacher {config.teacher} and student {config.student} use different tokenizer "
                         "vocabularies; token-level distillation needs one shared vocabulary")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise InputError("the student's tokenizer has neither a pad nor an EOS token")
    teacher.eval().requires_grad_(False)
    student.train()
    return tokenizer, student, teacher


# ---------------------------------------------------------------- save and find


def save_checkpoint(out_dir: Path, name: str, model: PreTrainedModel, tokenizer: Tokenizer, state: dict,
                    optimizer_state: dict | None = None, weights: dict | None = None) -> Path:
    """Write model, tokenizer, optimizer state and trainer_state.json into OUT/name atomically
    (`weights`: the model's full state dict when the model itself holds only shards)."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=out_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}))
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        write_json_atomic(tmp / STATE_FILE, {**state, "paced_version": __version__})  # last: complete
        if final.exists():  # e.g. `final` of an earlier, shorter run: move aside, then replace
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{name}.", dir=out_dir))
            os.replace(final, old / name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete `checkpoint-{step}` folders in OUT, by step."""
    found = []
    if Path(out_dir).is_dir():
        for path in Path(out_dir).iterdir():
            match = _CHECKPOINT_RE.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint to resume from: `final` if complete, else the highest step, else None."""
    final = Path(out_dir) / FINAL
    if (final / STATE_FILE).is_file():
        return final
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def read_state(checkpoint: Path) -> dict:
    try:
        return read_json(Path(checkpoint) / STATE_FILE)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {Path(checkpoint) / STATE_FILE}: {err}") from err


def load_optimizer_state(checkpoint: Path) -> dict | None:
    import torch

    path = Path(checkpoint) / OPTIMIZER_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def check_resumable(saved_config: dict, config_json: dict, changeable: set[str]) -> None:
    """InputError naming every setting that differs from the run being resumed."""
    differ = sorted(k for k in set(saved_config) | set(config_json)
                    if k not in changeable and saved_config.get(k) != config_json.get(k))
    if differ:
        detail = {k: {"checkpoint": saved_config.get(k), "now": config_json.get(k)} for k in differ}
        raise InputError(f"--resume: these settings differ from the checkpoint's run: {', '.join(differ)} "
                         f"(resume with the same settings, or train into a new --out)", detail=detail)


# ---------------------------------------------------------------- where a run stands


@dataclass
class Progress:
    """Where the run stands; what trainer_state.json records besides config and RNG.

    `tokens` and `skipped_rows` hold the totals of the checkpoint resumed from (all processes);
    this process's own counts since then are `local_tokens` and `local_rows` (plus the rows its
    current stream skipped)."""

    step: int = 0
    stage: int = 0
    stage_step: int = 0
    stage_steps: list[int] = field(default_factory=list)
    source: str = ""
    skipped_batches: int = 0
    tokens: int = 0
    skipped_rows: int = 0
    seconds: float = 0.0
    data_exhausted: bool = False
    remeasures: list[RemeasureRecord] = field(default_factory=list)
    pending: PendingRemeasure | None = None  # saved checkpoint, snapshot and source maybe not yet
    evals: list[EvalPoint] = field(default_factory=list)  # the --eval-every curve
    first_loss: float | None = None  # this process's mean loss of the first and last step
    last_loss: float | None = None
    local_tokens: int = 0
    local_rows: int = 0  # rows skipped by this process's earlier streams (before a source change)
    generated_tokens: int = 0  # sampled from the student while training, all processes
    group: dict = field(default_factory=dict)  # --group-size counts, all processes (paced/trainer/group.py)

    @classmethod
    def from_state(cls, state: dict | None, stages: int, source: str) -> Progress:
        if state is None:
            return cls(stage_steps=[0] * stages, source=source)
        keep = ("step", "stage", "stage_step", "stage_steps", "source", "skipped_batches",
                "tokens", "skipped_rows", "seconds", "first_loss", "last_loss")
        return cls(**{k: state.get(k) for k in keep},
                   remeasures=[RemeasureRecord.from_json(r) for r in state.get("refreshes") or []],
                   pending=PendingRemeasure.from_json(state.get("pending_refresh")),
                   evals=[EvalPoint.from_json(e) for e in state.get("evals") or []],
                   generated_tokens=int(state.get("generated_tokens") or 0),
                   group=dict(state.get("group") or {}))

    @property
    def rollout_tokens(self) -> int:
        """Tokens generated by re-measurement rollouts so far."""
        return sum(r.rollout_tokens for r in self.remeasures)

    def totals(self, runtime: Runtime, stream: BatchStream) -> tuple[int, int]:
        """(tokens, skipped rows) over all processes. Collective: every process must call it."""
        local_rows = self.local_rows + stream.skipped_rows
        tokens, rows = runtime.sum([float(self.local_tokens), float(local_rows)])
        rows = local_rows if stream.source.shared else rows  # shared: every rank saw every row
        return self.tokens + int(tokens), self.skipped_rows + int(rows)

    def record(self, runtime: Runtime, stream: BatchStream) -> dict:
        """trainer_state.json's view of the run (the stream's position included)."""
        tokens, rows = self.totals(runtime, stream)
        return {"step": self.step, "stage": self.stage, "stage_step": self.stage_step,
                "stage_steps": list(self.stage_steps), "source": self.source, **stream.state_dict(),
                "skipped_batches": self.skipped_batches, "tokens": tokens, "skipped_rows": rows,
                "seconds": round(self.seconds, 3), "refreshes": [r.to_json() for r in self.remeasures],
                "pending_refresh": self.pending.to_json() if self.pending else None,
                "evals": [e.to_json() for e in self.evals], "first_loss": self.first_loss,
                "last_loss": self.last_loss, "world_size": runtime.world_size,
                "generated_tokens": self.generated_tokens, "group": self.group}


def save(trainee: Trainee, progress: Progress, name: str, stream: BatchStream,
         optimizer: Optimizer | None = None, schedule: LRScheduler | None = None,
         extra: dict | None = None) -> Path:
    """Rank 0 writes OUT/name from `trainee`; every process takes part in the reductions."""
    from paced.trainer import sharding

    state = {"config": trainee.settings(), **progress.record(trainee.runtime, stream), **(extra or {})}
    weights = sharding.model_state(trainee)  # gathered from every process under --fsdp, else None
    opt = {"optimizer": sharding.optimizer_state(trainee, optimizer), "scheduler": schedule.state_dict()} \
        if optimizer else None
    if trainee.runtime.rank == 0:
        state["rng"] = capture_rng_state()
        out = Path(trainee.config.out)
        save_checkpoint(out, name, trainee.raw_student, trainee.tokenizer, state, opt, weights)
    if trainee.runtime.distributed:
        import torch.distributed as dist

        dist.barrier()
    return Path(trainee.config.out) / name


def rewrite_state(trainee: Trainee, progress: Progress, name: str, stream: BatchStream) -> None:
    """Record `progress` in OUT/name's trainer_state.json; weights, optimizer and RNG state stay
    as saved (collective). The rename keeps the checkpoint complete at every moment."""
    record = progress.record(trainee.runtime, stream)
    if trainee.runtime.rank == 0:
        path = Path(trainee.config.out) / name / STATE_FILE
        write_json_atomic(path, {**read_state(path.parent), "config": trainee.settings(), **record,
                                 "paced_version": __version__})
    if trainee.runtime.distributed:
        import torch.distributed as dist

        dist.barrier()


def resume_point(config: TrainConfig, settings: dict, changeable: set[str]) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to overwrite an earlier run.
    `settings`: what the run is told (the config and its hooks' settings), held against the
    checkpoint's."""
    out = Path(config.out)
    if config.resume and out.is_dir() and int(os.environ.get("RANK", "0")) == 0:
        for leftover in out.glob(".tmp-*"):  # a checkpoint a killed run was still writing
            shutil.rmtree(leftover, ignore_errors=True)
    found = latest_checkpoint(out)
    if found is None:
        if config.resume:
            log.info("--resume: no checkpoint in %s yet; starting from the beginning", out)
        return None
    if not config.resume:
        raise InputError(f"--out {out} already holds checkpoints ({found.name}); pass --resume to continue "
                         "that run, or choose a new --out")
    check_resumable(read_state(found)["config"], settings, changeable)
    return found


def make_summary(trainee: Trainee, progress: Progress, stream: BatchStream,
                 checksums: list | None = None) -> dict:
    """The run's summary (stdout and OUT/final). Collective: every process must call it."""
    config = trainee.config
    tokens, rows = progress.totals(trainee.runtime, stream)
    source = stream.source
    summary = {
        "steps": progress.step,
        "stages": [{"loss": s.loss, "steps": s.steps, "steps_done": done,
                    "on_policy": s.resolved_on_policy(config.on_policy)}
                   for s, done in zip(config.schedule, progress.stage_steps, strict=True)],
        "skipped_zero_weight_batches": progress.skipped_batches,
        "skipped_rows_without_completion": rows,
        "train_tokens": tokens,
        "loss_first": progress.first_loss, "loss_last": progress.last_loss,
        "train_seconds": round(progress.seconds, 3),
        "steps_per_second": round(progress.step / max(progress.seconds, 1e-9), 3),
        "tokens_per_second": round(tokens / max(progress.seconds, 1e-9), 1),
        "data_exhausted": progress.data_exhausted,
        "world_size": trainee.runtime.world_size,
        "source": progress.source,
        **compute_summary(progress, tokens),
        **flops_record(trainee, tokens, progress.generated_tokens, progress.rollout_tokens),
        **group_summary(progress.group),
        "refreshes": [r.to_json() for r in progress.remeasures],
        "eval_curve": [e.to_json() for e in progress.evals],
        "final_checkpoint": str(Path(config.out) / FINAL),
    }
    if not source.shared:  # the current source's leases (after a refresh: the new run's)
        leased, acked, conflicts = trainee.runtime.sum([source.leased, source.acked, source.conflicts])
        summary |= {"shards_leased": int(leased), "shards_acked": int(acked), "ack_conflicts": int(conflicts)}
    if checksums is not None:
        summary["parameter_checksums"] = checksums
    return summary


def group_summary(counts: dict) -> dict:
    """--group-size counts: steps and samples, those of weight 0, correct, grading failures."""
    if not counts:
        return {}
    steps, samples = counts.get("steps", 0), counts.get("samples", 0)
    return {"group": {**counts, "zero_weight_steps": counts.get("zero_weight_steps", 0),
                      "zero_weight_step_share": round(counts.get("zero_weight_steps", 0) / max(steps, 1), 6),
                      "zero_weight_sample_share":
                          round(counts.get("zero_weight_samples", 0) / max(samples, 1), 6),
                      "pass_rate": round(counts.get("correct", 0) / max(samples, 1), 6)}}


def compute_summary(progress: Progress, train_tokens: int) -> dict:
    """Compute spent: training (loss tokens, step seconds), refresh rollouts (generated tokens,
    seconds), and the totals. Refresh seconds cover a refresh's save, rollout, snapshot and
    manifest; eval seconds are reported apart."""
    r = progress.remeasures
    rollout_tokens = progress.rollout_tokens
    refresh_seconds = sum(x.refresh_seconds for x in r)
    return {"rollout_tokens": rollout_tokens, "rollout_samples": sum(x.rollout_samples for x in r),
            "rollout_seconds": round(sum(x.rollout_seconds for x in r), 3),
            "refresh_seconds": round(refresh_seconds, 3),
            "eval_seconds": round(sum(e.seconds for e in progress.evals), 3),
            "total_tokens": train_tokens + rollout_tokens,
            "total_seconds": round(progress.seconds + refresh_seconds, 3)}
