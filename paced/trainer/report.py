"""Training logs (`--report-to`): per optimizer step, per re-measurement and per eval, written by
rank 0 to OUT/metrics.jsonl (one JSON object a line) and/or TensorBoard event files in
OUT/tensorboard (the optional extra `tensorboard`).

Every line has `kind` ("step", "refresh" or "eval") and `step`. Step lines carry the loss, the
learning rate of the update, tokens and seconds, and the step's rows' shard weights: effective
sample size (Σw)²/Σw², mean weight, share of zero-weight rows; with --group-size also the share of
samples weighing 0, whether the step was skipped (Σw = 0), the groups' mean p̂ and their split at
p̂ = 0, 0 < p̂ < 1, p̂ = 1. Refresh lines carry the new snapshot's frontier (as the re-measurement
job records it), eval lines the held-out accuracy. In TensorBoard each number is a scalar
`KIND/NAME` at its step.

Resume: the lines after the checkpoint's step are dropped (they are trained again), and a line
whose (kind, step) is already in the file is not written twice; TensorBoard is told to purge the
events after the checkpoint's step (`purge_step`; a fresh run: all), so each step is shown once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from paced.curriculum.frontier import compute_frontier
from paced.errors import InputError

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from paced.trainer.checkpoint import Progress
    from paced.trainer.loop import Meter, Runtime

REPORTERS = ("jsonl", "tensorboard", "none")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# --group-size counts by the groups' p̂
GROUP_FRONTIER = ("groups", "groups_zero", "groups_mid", "groups_one")
GROUP_COUNTS = ("steps", "samples", "zero_weight_samples", "zero_weight_steps", "correct", *GROUP_FRONTIER)


def parse_report_to(text: str) -> list[str]:
    """`"jsonl,tensorboard"` -> ["jsonl", "tensorboard"], or InputError naming the choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in REPORTERS]
    if bad or not names:
        raise InputError(f"--report-to: unknown {', '.join(map(repr, bad)) or 'empty value'}; "
                         f"choose from {', '.join(REPORTERS)} (repeat the flag or separate with commas)")
    return names


def check_report_to(names: tuple[str, ...]) -> None:
    """InputError when `names` mixes 'none' with a writer or names an unknown one."""
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise InputError(f"--report-to: unknown {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(REPORTERS)}")
    if "none" in names and len(set(names)) > 1:
        raise InputError("--report-to none turns the logs off: give it alone, or drop it")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise InputError("--report-to tensorboard needs the tensorboard package: pip install "
                             "'paced[tensorboard]' (or drop it: metrics.jsonl has the same figures)") from err


# ---------------------------------------------------------------- pure figures


def compute_group_frontier(correct: list[int], k: int) -> dict:
    """Counts of groups of `k` samples at p̂ = 0, 0 < p̂ < 1 and p̂ = 1 (p̂ = correct / k)."""
    f = compute_frontier([c / k for c in correct], [k] * len(correct))
    return dict(zip(GROUP_FRONTIER, (f.problems, f.zero, f.mid, f.one), strict=True))


def compute_weight_figures(weight_sum: float, weight_sq_sum: float, rows: int, zero_rows: int) -> dict:
    """ESS (Σw)²/Σw², mean weight and zero-weight share of a step's rows (None without rows)."""
    if rows == 0:
        return {"rows": 0, "weight_ess": None, "weight_mean": None, "zero_weight_share": None}
    ess = weight_sum * weight_sum / weight_sq_sum if weight_sq_sum > 0 else 0.0
    return {"rows": rows, "weight_ess": ess, "weight_mean": weight_sum / rows,
            "zero_weight_share": zero_rows / rows}


def compute_group_figures(before: dict, after: dict) -> dict:
    """One step's group figures from the run's cumulative --group-size counts before and after it."""
    d = {name: after.get(name, 0) - before.get(name, 0) for name in GROUP_COUNTS}
    samples, groups = d["samples"], d["groups"]
    return {"group_samples": samples,
            "group_zero_weight_sample_share": d["zero_weight_samples"] / samples if samples else None,
            "group_skipped": bool(d["zero_weight_steps"]),
            "group_mean_pass_rate": d["correct"] / samples if samples else None,
            "group_share_zero": d["groups_zero"] / groups if groups else None,
            "group_share_mid": d["groups_mid"] / groups if groups else None,
            "group_share_one": d["groups_one"] / groups if groups else None}


def refresh_figures(record: dict) -> dict:
    """The line of one re-measurement: its snapshot and the new snapshot's frontier figures."""
    keep = ("round", "snapshot_id", "carried", "rollout_samples", "rollout_seconds", "refresh_seconds")
    return {k: record[k] for k in keep if k in record} | dict(record.get("frontier") or {})


# ---------------------------------------------------------------- the writers


def update_lr(schedule: LRScheduler) -> float:
    """The learning rate of the update just made (the schedule has already stepped past it)."""
    return float(schedule.base_lrs[0] * schedule.lr_lambdas[0](schedule.last_epoch - 1))


class Reporter:
    """The run's log writers (rank 0 writes; every process calls `step`, which reduces)."""

    def __init__(self, out: Path, names: tuple[str, ...], rank: int, resume_step: int | None,
                 progress: Progress):
        self.names = tuple(n for n in names if n != "none") if rank == 0 else ()
        self.path = Path(out) / METRICS_FILE
        self.seen: set[tuple[str, int]] = set()
        self.group = dict(progress.group)  # the run's cumulative --group-size counts at the last step line
        self.local_tokens = progress.local_tokens  # this process's trained tokens at the last step line
        self.writer = None
        if self.names:
            Path(out).mkdir(parents=True, exist_ok=True)
        if "jsonl" in self.names:
            self.seen = trim_lines(self.path, resume_step)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1  # a fresh run hides a killed one's events
            self.writer = SummaryWriter(log_dir=str(Path(out) / TENSORBOARD_DIR), purge_step=purge)

    def step(self, runtime: Runtime, progress: Progress, meter: Meter, lr: float, seconds: float) -> None:
        """The line of the step just made (`meter`: this process's statistics of it). Collective:
        every process calls it (the sums run over processes; the group counts are global already).
        The loss is the mean over processes of each one's mean micro-batch loss."""
        tokens, self.local_tokens = progress.local_tokens - self.local_tokens, progress.local_tokens
        has_loss = meter.batches > 0
        w, w2, rows, zero, loss_sum, losses, tokens_sum = runtime.sum(
            [meter.weight, meter.weight_sq, float(meter.rows), float(meter.zero_rows),
             meter.loss / meter.batches if has_loss else 0.0, float(has_loss), float(tokens)])
        line = {"stage": progress.stage, "loss": loss_sum / losses if losses else None, "lr": lr,
                "tokens": int(tokens_sum), "seconds": round(seconds, 4),
                **compute_weight_figures(w, w2, int(rows), int(zero))}
        if progress.group:
            line |= compute_group_figures(self.group, progress.group)
            self.group = dict(progress.group)
        self.write("step", progress.step, line)

    def refresh(self, step: int, record: dict) -> None:
        self.write("refresh", step, refresh_figures(record))

    def eval(self, step: int, entry: dict) -> None:
        self.write("eval", step,
                   {k: entry[k] for k in ("accuracy", "train_tokens", "train_seconds") if k in entry})

    def write(self, kind: str, step: int, figures: dict) -> None:
        if not self.names or (kind, step) in self.seen:
            return
        self.seen.add((kind, step))
        if "jsonl" in self.names:
            with self.path.open("a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **figures}) + "\n")  # closed: a kill keeps it
        if self.writer is not None:
            for name, value in figures.items():
                if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
                    self.writer.add_scalar(f"{kind}/{name}", float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def trim_lines(path: Path, resume_step: int | None) -> set[tuple[str, int]]:
    """Keep the lines of steps up to `resume_step` (None: a fresh run keeps none); their keys.
    A torn last line (killed mid-write) is dropped. Rewritten atomically."""
    if not path.is_file():
        return set()
    kept, keys = [], set()
    if resume_step is not None:
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if isinstance(line, dict) and isinstance(line.get("step"), int) and line["step"] <= resume_step:
                kept.append(text)
                keys.add((line.get("kind"), line["step"]))
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(t + "\n" for t in kept))
    os.replace(tmp, path)
    return keys
