"""On-policy group distillation: K samples per prompt from the current student, graded, each
sample's loss weighted by w(p̂) of its group (the regime of the PACED paper; DESIGN.md §8).

One optimizer step (`GroupStep`), on every process:

1. **Sample.** Each micro-batch's B prompts get K completions each from the current student,
   through the backend interface (`paced.backends`: `HFBackend.from_model` on the in-memory
   student here; an engine whose weights follow the trainer can take its place, see
   `make_sampler`). Sample j of the o-th occurrence of problem P in step s has index
   i = o·K + j and seed `sample_seed(step_seed(seed, s), P, i)` — the seed `paced rollout
   --seed step_seed(seed, s)` gives sample i of P — so a resumed run draws the same samples.
2. **Grade.** `Grading.grade` with the data set's grader against the row's `answer` (the
   composition root runs it in the killable grading workers, paced/grading/pool.py; a timeout
   or an error counts as wrong, and is counted). p̂ = c/K per prompt.
3. **Weigh.** w = `compute_group_weights(c, K, scheme)` per prompt, given to each of its K
   samples (`paced-posterior`: the prior adds the row's snapshot counts, pass_rate·n of n, when
   the row has them). Samples of weight 0 are not forwarded at all.
4. **Commit.** The step's graded samples go to the `SampleSink` (rank 0, all processes'
   samples) as rollouts of the checkpoint that drew them; the sink commits each sample once.
   With --group-snapshot-every N, every N steps the `Remeasure` hook's `from_samples` turns the
   samples committed since the last snapshot into the lineage's next one (paced/trainer/remeasure.py).
5. **Train.** loss = Σ w·L / Σ w over every sample of the step — all its micro-batches and, under
   DDP, all processes (the weight sum is all-reduced; each process backpropagates
   world·Σ_local w·L / W, which DDP's gradient mean turns into the global ratio). L is the
   stage's loss (reverse KL by default) of the teacher on the student's own tokens. With
   `--group-normalize samples` the divisor is the step's sample count N instead of Σ w: the
   weights then scale the step (a step where few samples weigh moves the student little)
   rather than share it out.

**Σ w = 0** (every prompt of the step at p̂ ∈ {0, 1} under `paced` or `hard-filter`): the step
is *skipped*: no teacher or student forward, no optimizer update; the learning-rate schedule
still advances and the step counts toward the budget (its samples were drawn, graded and
committed: that compute is spent). Counted as `zero_weight_steps` in the summary and logged.
We chose skipping over a uniform fallback because a uniform step on a group with no contrast
is exactly what the weighting is meant to avoid.

Rows of weight 0 in the shard (the manifest's or service's selection) are never sampled:
selection decides which prompts are drawn, the group weights act inside the step (the shard
weight of a selected row does not multiply its group weight). `paced train` wires `Grading`
and `SampleSink` (paced/jobs/group_rollouts.py); the trainer never touches the data home.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from paced.backends.base import Completion, SamplingConfig, derive_seed, sample_seed
from paced.curriculum import WeightScheme, compute_weights, posterior_weight
from paced.errors import InputError
from paced.trainer.report import GROUP_FRONTIER, compute_group_frontier

if TYPE_CHECKING:
    import torch
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from paced.backends.base import Backend
    from paced.trainer.checkpoint import Progress
    from paced.trainer.config import Stage, TrainConfig
    from paced.trainer.data import Batch, Rows
    from paced.trainer.loop import Trainee

log = logging.getLogger(__name__)

CORRECT = "correct"
FAILED = ("timeout", "error")  # grading failures: wrong for p̂, counted apart


# ---------------------------------------------------------------- what the trainer is given


@dataclass(frozen=True)
class SampleRecord:
    """One graded training sample, as a rollout row (ROLLOUT_SCHEMA without the ids)."""

    problem_id: str
    dataset: str
    sample_idx: int
    completion: str
    outcome: str
    tokens: int
    finish_reason: str
    grader: str


class Grading(Protocol):
    """Grades answers with a data set's grader: one (outcome, grader label) per item, in order."""

    def grade(self, dataset: str, items: list[tuple[str, str]]) -> list[tuple[str, str]]: ...


class SampleSink(Protocol):
    """Commits the graded samples of optimizer step `step` (drawn by checkpoint-`step`, i.e. the
    weights after `step` steps, under `sampling`), each sample exactly once across resumes."""

    def commit(self, step: int, sampling: SamplingConfig, records: list[SampleRecord]) -> None: ...


@dataclass
class GroupIO:
    """The group mode's outside world, wired by `paced train`'s composition root."""

    grading: Grading
    sink: SampleSink | None = None


# ---------------------------------------------------------------- pure parts


def step_seed(seed: int, step: int) -> int:
    """The run seed of step `step`'s samples (the `--seed` that `paced rollout` would need)."""
    return derive_seed(seed, f"group-step-{step}")


def step_sampling(config: TrainConfig, step: int) -> SamplingConfig:
    """The sampling of step `step`'s groups (what the `SampleSink` is handed with them)."""
    return SamplingConfig(n=1, temperature=config.sample_temperature, top_p=config.sample_top_p,
                          max_new_tokens=config.max_new_tokens, seed=step_seed(config.seed, step),
                          chat_template=config.chat_template)


def scheme_of(config: TrainConfig) -> WeightScheme:
    return WeightScheme(name=config.group_scheme, alpha=config.group_alpha, beta=config.group_beta,
                        prior=config.group_prior)


def compute_group_weights(correct: Sequence[int] | np.ndarray, k: int, scheme: WeightScheme,
                          prior_correct: np.ndarray | None = None,
                          prior_n: np.ndarray | None = None) -> np.ndarray:
    """w(p̂) per prompt from c correct of K samples. `paced-posterior` adds the prompt's snapshot
    counts (`prior_correct` of `prior_n`, 0 where unknown) to the Beta prior; the other schemes
    use c/K alone. Guards (floor, mix) do not apply inside a group."""
    c = np.asarray(correct, dtype=np.float64)
    if k < 1 or (c < 0).any() or (c > k).any():
        raise InputError(f"need 0 <= correct <= K with K >= 1, got K={k}, correct={c.tolist()}")
    if scheme.name == "paced-posterior":
        c0 = np.zeros_like(c) if prior_correct is None else np.asarray(prior_correct, dtype=np.float64)
        n0 = np.zeros_like(c) if prior_n is None else np.asarray(prior_n, dtype=np.float64)
        return posterior_weight(c + c0, k + n0, scheme.alpha, scheme.beta, scheme.prior)
    return compute_weights(c, np.full_like(c, float(k)),
                           WeightScheme(name=scheme.name, alpha=scheme.alpha, beta=scheme.beta))


@dataclass(frozen=True)
class PromptRow:
    """What the group mode needs of one shard row."""

    problem_id: str
    dataset: str
    prompt: str
    answer: str | None  # graded against; also what a teacher template may show
    n: float = 0.0  # the row's snapshot counts (paced-posterior's prior), 0 where it has none
    pass_rate: float = 0.0


def prompt_rows(rows: Rows) -> list[PromptRow]:
    """The rows' prompts with their ids, answers and snapshot counts; InputError when the shard
    lacks the ids (the group mode seeds and commits samples by problem)."""
    for name in ("problem_id", "dataset"):
        if any(v is None for v in rows.column(name)):
            raise InputError(f"--group-size needs the shard rows' `{name}`; these rows have none "
                             "(train from a manifest built by `paced manifest build` or a service run)")
    return [PromptRow(pid, ds, prompt, answer, float(n or 0), float(rate or 0.0))
            for pid, ds, prompt, answer, n, rate in zip(rows.column("problem_id"), rows.column("dataset"),
                                                      rows.prompts, rows.column("answer"), rows.column("n"),
                                                      rows.column("pass_rate"), strict=True)]


def prior_counts(rows: list[PromptRow]) -> tuple[np.ndarray, np.ndarray]:
    """(correct, n) of each row's snapshot (pass_rate·n of n); (0, 0) where the row has none."""
    n = np.array([r.n for r in rows], dtype=np.float64)
    rate = np.array([r.pass_rate for r in rows], dtype=np.float64)
    return np.round(np.clip(rate, 0, 1) * n), n


def sample_indices(problem_ids: list[str], k: int, taken: Counter) -> list[int]:
    """The first sample index of each prompt: o·K for its o-th occurrence in the step (`taken`
    counts occurrences so far and is updated)."""
    firsts = []
    for pid in problem_ids:
        firsts.append(taken[pid] * k)
        taken[pid] += 1
    return firsts


# ---------------------------------------------------------------- one step


@dataclass
class Group:
    """One prompt's K graded samples and its weight."""

    row: PromptRow
    first: int  # sample index of the first of the K samples
    completions: list[Completion]
    outcomes: list[str]
    grader: str
    weight: float = 0.0

    @property
    def correct(self) -> int:
        return sum(o == CORRECT for o in self.outcomes)


def make_sampler(trainee: Trainee) -> Backend:
    """The student's sampler: a `paced.backends` Backend over the in-memory student. (A vLLM
    engine that loads the trainer's weights after every optimizer step, as TRL's colocate mode
    does, would be returned here on GPUs; the group step only calls `generate`.)"""
    from paced.backends.hf_backend import HFBackend

    return HFBackend.from_model(trainee.raw_student, trainee.tokenizer, batch_size=512)


def sample_groups(backend: Backend, rows: list[PromptRow], firsts: list[int], k: int,
                  params: SamplingConfig) -> list[list[Completion]]:
    """K completions per row, one request per sample with its own seed (see the module doc)."""
    prompts, seeds = [], []
    for row, first in zip(rows, firsts, strict=True):
        for j in range(first, first + k):
            prompts.append(row.prompt)
            seeds.append(sample_seed(params.seed, row.problem_id, j))
    flat = backend.generate(prompts, params, seeds=seeds)
    return [[cs[0] for cs in flat[i * k:(i + 1) * k]] for i in range(len(rows))]


def grade_groups(grading: Grading, rows: list[PromptRow],
                 completions: list[list[Completion]]) -> list[tuple[list, str]]:
    """(outcomes, grader label) per row, grading every row's samples against its `answer`."""
    missing = [r.problem_id for r in rows if r.answer is None]
    if missing:
        raise InputError(f"--group-size grades samples against the shard rows' `answer`, and {len(missing)} "
                         f"rows have none (e.g. {missing[0]}); rebuild the manifest or run with this "
                         "version of paced")
    by_dataset: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_dataset.setdefault(row.dataset, []).append(i)
    out: list[tuple[list, str]] = [([], "")] * len(rows)
    for dataset, idx in by_dataset.items():
        items = [(c.text, rows[i].answer) for i in idx for c in completions[i]]
        verdicts = grading.grade(dataset, items)
        for n, i in enumerate(idx):
            mine = verdicts[n * len(completions[i]):(n + 1) * len(completions[i])]
            out[i] = ([o for o, _ in mine], mine[0][1] if mine else "")
    return out


@dataclass
class GroupStep:
    """The samples of one optimizer step, micro-batch by micro-batch, then the weighted update."""

    trainee: Trainee
    step: int
    groups: list[list[Group]] = field(default_factory=list)  # per micro-batch
    taken: Counter = field(default_factory=Counter)
    generated_tokens: int = 0
    spare: PromptRow | None = None  # a row to forward when this process has no sample of weight > 0

    @property
    def params(self) -> SamplingConfig:
        return step_sampling(self.trainee.config, self.step)

    def add(self, batch: Batch) -> None:
        """Sample K completions for each selected row (shard weight > 0) of one micro-batch and
        grade them."""
        trainee, k = self.trainee, self.trainee.config.group_size
        every = prompt_rows(batch)
        self.spare = self.spare or (every[0] if every else None)
        rows = [row for row, weight in zip(every, batch.weights, strict=True) if weight > 0]
        if not rows:  # another process has rows: this one joins the update with a zero loss
            self.groups.append([])
            return
        firsts = sample_indices([r.problem_id for r in rows], k, self.taken)
        with trainee.runtime.autocast():
            completions = sample_groups(make_sampler(trainee), rows, firsts, k, self.params)
        graded = grade_groups(trainee.group_io.grading, rows, completions)
        self.groups.append([Group(r, f, cs, outs, grader) for r, f, cs, (outs, grader)
                            in zip(rows, firsts, completions, graded, strict=True)])
        self.generated_tokens += sum(c.tokens for cs in completions for c in cs)

    def weigh(self) -> float:
        """Set every group's weight; the step's Σ w over samples (all processes)."""
        flat = [g for batch in self.groups for g in batch]
        k = self.trainee.config.group_size
        prior_c, prior_n = prior_counts([g.row for g in flat])
        scheme = scheme_of(self.trainee.config)
        weights = compute_group_weights([g.correct for g in flat], k, scheme, prior_c, prior_n)
        for g, w in zip(flat, weights, strict=True):
            g.weight = float(w)
        return float(k * weights.sum())

    def records(self) -> list[SampleRecord]:
        return [SampleRecord(g.row.problem_id, g.row.dataset, g.first + j, c.text, o, c.tokens,
                             c.finish_reason, g.grader)
                for batch in self.groups for g in batch
                for j, (c, o) in enumerate(zip(g.completions, g.outcomes, strict=True))]

    def stats(self) -> list[float]:
        """This process's [samples, zero-weight samples, correct, grading failures, generated tokens,
        then groups, groups at p̂ = 0, at 0 < p̂ < 1, at p̂ = 1] (the last four: GROUP_FRONTIER)."""
        flat = [g for batch in self.groups for g in batch]
        k = self.trainee.config.group_size
        frontier = compute_group_frontier([g.correct for g in flat], k)
        return [float(k * len(flat)), float(k * sum(g.weight == 0 for g in flat)),
                float(sum(g.correct for g in flat)),
                float(sum(o in FAILED for g in flat for o in g.outcomes)), float(self.generated_tokens),
                *(float(frontier[name]) for name in GROUP_FRONTIER)]

    # ---- the update

    def finish(self, stage: Stage, optimizer: Optimizer, schedule: LRScheduler, progress: Progress) -> bool:
        """Weigh, commit, and (unless Σ w = 0) backpropagate Σ w·L / Σ w and step the optimizer;
        whether this process has a loss to report (`progress.last_loss`)."""
        trainee = self.trainee
        local_weight = self.weigh()
        weight_sum, *stats = trainee.runtime.sum([local_weight, *self.stats()])
        divisor = stats[0] if trainee.config.group_normalize == "samples" else weight_sum
        self.commit()
        counts = progress.group
        for name, value in zip(("samples", "zero_weight_samples", "correct", "grading_failures"), stats,
                               strict=False):
            counts[name] = counts.get(name, 0) + int(value)
        progress.generated_tokens += int(stats[4])
        # the step's groups by p̂ (training logs)
        for name, value in zip(GROUP_FRONTIER, stats[5:], strict=True):
            counts[name] = counts.get(name, 0) + int(value)
        counts["steps"] = counts.get("steps", 0) + 1
        if weight_sum == 0:
            counts["zero_weight_steps"] = counts.get("zero_weight_steps", 0) + 1
            log.info("step %d: every sample weighs 0 (%d samples): skipped", self.step, int(stats[0]))
            with warnings.catch_warnings():  # torch warns of a schedule step before any optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                schedule.step()  # the schedule follows the step count; no update this step
            return False
        losses = []
        for batch in self.groups:
            value, tokens, loss = self.batch_loss(batch, stage, divisor)
            loss.backward()
            progress.local_tokens += tokens
            if value is not None:
                losses.append(value)
        from paced.trainer.loop import apply_update

        apply_update(trainee, optimizer, schedule, progress, losses)
        return bool(losses)

    def batch_loss(self, batch: list[Group], stage: Stage,
                   divisor: float) -> tuple[float | None, int, torch.Tensor]:
        """(local Σ w·L / Σ w or None, trained tokens, world · Σ w·L / D to backpropagate) of
        one micro-batch, D the step's Σ w or (--group-normalize samples) its sample count. A
        micro-batch without weight on this process forwards one sample and backpropagates 0, so
        DDP's all-reduce still happens."""
        import torch

        from paced.trainer.loop import forward_pair
        from paced.trainer.losses import LOSSES

        trainee, config = self.trainee, self.trainee.config
        picked = [(g, j) for g in batch for j in range(len(g.completions)) if g.weight > 0]
        eos = trainee.tokenizer.eos_token_id
        if not picked:
            student, _, _ = forward_pair(trainee, [self.spare.prompt], [self.spare.answer], [[eos]])
            return None, 0, student.sum() * 0.0
        targets = [list(g.completions[j].token_ids or ()) or [eos] for g, j in picked]
        student, teacher, mask = forward_pair(trainee, [g.row.prompt for g, _ in picked],
                                              [g.row.answer for g, _ in picked], targets)
        weights = torch.tensor([g.weight for g, _ in picked], dtype=torch.float32, device=student.device)
        with trainee.runtime.autocast():
            per_seq = LOSSES[stage.loss](student, teacher, mask, chunk_size=config.loss_chunk_size,
                                         **config.loss_kwargs(stage.loss))
        weighted = (weights * per_seq).sum()
        value = float(weighted.detach()) / float(weights.sum())
        return value, int(mask.sum()), weighted * (trainee.runtime.world_size / divisor)

    def commit(self) -> None:
        """Hand the step's samples (every process's, gathered on rank 0) to the sink."""
        sink = self.trainee.group_io.sink
        runtime = self.trainee.runtime
        records = self.records()
        if runtime.distributed:
            import torch.distributed as dist

            gathered: list = [None] * runtime.world_size
            dist.all_gather_object(gathered, records)
            seen, records = set(), []
            for rec in (r for part in gathered for r in part):  # the same problem on two ranks: once
                if (rec.problem_id, rec.sample_idx) not in seen:
                    seen.add((rec.problem_id, rec.sample_idx))
                    records.append(rec)
        if sink is not None and runtime.rank == 0:
            sink.commit(self.step, self.params, records)
