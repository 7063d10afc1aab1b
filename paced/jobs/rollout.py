"""Roll out a student K times per problem, grade every answer, commit rollouts batch by batch.

    paced rollout --student DIR [--student-id ID] --dataset NAME -k 8 --temperature 1.0 \\
        --top-p 1.0 --max-new-tokens N --seed S [--backend auto|vllm|transformers] [--limit N] \\
        [--batch-size 256] [--shard RANK/WORLD] [--ray [ADDRESS]] [vLLM engine options] --home DIR

Contract:
- **Student id**: `--student-id`, else the backends' `model_id(DIR)` (a hash of the model files).
- **Sampling hash**: the backends' `SamplingConfig.hash()` of the config with `n` set to 1, so
  it covers temperature, top_p, max_new_tokens, seed (the round's, see below), stop strings
  and chat template, but never K. `sampling.json` beside the batches holds the full config.
- **Seeds**: sample j of problem P is its own request (n = 1) with seed
  `derive_seed(S, P) + j` (mod 2^62), so sample j is the same draw whatever K, batch or run
  asked for it (the backends seed per request, not per batch). vLLM shares the prompt's
  prefill across the K requests through its prefix cache.
- **Round** (the trainer's re-probes): round r > 0 samples with run seed `derive_seed(S,
  "round-r")` in place of S: fresh draws, a sampling hash of their own. Round 0 is S itself.
- **What is pending**: problems sorted by id (`--limit N`: the first N; `problem_ids`: that
  subset), each missing the sample indices in 0..K-1 not yet committed under (student,
  sampling hash, data set). Raising K from 4 to 8 rolls out samples 4..7; new problems roll
  out in full. Nothing pending: the engine is not started.
- **Batches**: pending problems in id order, `--batch-size` problems at a time. Each batch is
  generated, graded and committed as one Parquet file (ROLLOUT_SCHEMA) written atomically.
  Commits happen in order (grading and writing overlap the next batch's generation), so a
  kill at any moment leaves a prefix of the batches; the rerun finds the same remaining
  batches and the final rows equal an uninterrupted run's: none lost, none doubled.
- **Shards** (`--shard RANK/WORLD`, or the Slurm/torchrun variables, see
  `paced.store.partition`): the shard takes only the problems whose id hashes to its rank
  (after `--limit`), and tags its batch files, so shards run at once on one home, each is
  resumable on its own, and their union is exactly the whole-pool run's rows (the seeds are
  per problem and sample). `paced refresh` reads every batch file of the folder.
- **Ray** (`--ray [ADDRESS]`): generation goes to one actor per device of a Ray cluster (see
  `paced.backends.ray_backend`); grading and commits stay in this process.

stdout: one JSON summary (student_id, sampling_hash, problems, rolled_out, samples, tokens,
seconds, samples_per_second, tokens_per_second, pass-rate summary of this run's problems);
stderr: a progress bar.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from paced.backends.base import Completion, SamplingConfig, derive_seed, sample_seed
from paced.backends.engine import (
    DEFAULT_ENGINE,
    EngineOptions,
    add_engine_arguments,
    engine_options,
    open_backend,
)
from paced.curriculum.summary import passrate_summary
from paced.errors import InputError
from paced.store.home import Home, open_home, validate_name
from paced.store.partition import WHOLE, Shard, add_shard_argument, announce_shard, resolve_shard
from paced.store.problems import dataset_info, read_problems
from paced.store.rollouts import (
    ROLLOUT_SCHEMA,
    batch_files,
    committed_samples,
    folder_lock,
    pass_counts,
    write_rollout_batch,
    write_sampling_config,
)

MAX_K = 1024  # samples per problem; more is a typo, not a measurement


@dataclass(frozen=True)
class RolloutConfig:
    """How to roll out: K samples per problem under one sampling config, in fixed batches."""

    k: int = 8  # samples per problem (K)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    round: int = 0  # re-probe round: > 0 draws fresh samples (see the module doc)
    stop: tuple[str, ...] = ()
    chat_template: bool = False
    batch_size: int = 256  # problems per committed batch
    grader_workers: int = 2
    grading_timeout_seconds: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("k", "batch_size", "grader_workers"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be >= 1, got {getattr(self, name)}", detail={"field": name})
        if self.k > MAX_K:
            raise InputError(f"`k` must be <= {MAX_K}, got {self.k}", detail={"field": "k"})
        if self.seed < 0 or self.round < 0:
            raise InputError(f"`seed` and `round` must be >= 0, got {self.seed}, {self.round}")
        self.sampling()  # validates temperature, top_p, max_new_tokens, stop

    @property
    def run_seed(self) -> int:
        return self.seed if self.round == 0 else derive_seed(self.seed, f"round-{self.round}")

    def sampling(self, n: int = 1) -> SamplingConfig:
        return SamplingConfig(n=n, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.run_seed, stop=self.stop,
                              chat_template=self.chat_template)

    @property
    def sampling_hash(self) -> str:
        return self.sampling(1).hash()

    def record(self) -> dict:
        """What `sampling.json` holds: everything that decides the samples (K excluded)."""
        s = asdict(self.sampling(1))
        s.pop("n")
        return {"sampling_hash": self.sampling_hash, **s, "base_seed": self.seed, "round": self.round,
                "seed_scheme": "derive_seed(seed, problem_id) + sample_idx"}


@dataclass(frozen=True)
class WorkItem:
    """Samples `first .. first+count-1` of one problem."""

    problem_id: str
    prompt: str
    answer: str
    first: int
    count: int


def missing_runs(have: list[int], k: int) -> list[tuple[int, int]]:
    """Contiguous (first, count) runs of the indices in 0..k-1 not in `have`."""
    present, runs = set(have), []
    for j in range(k):
        if j in present:
            continue
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def pending_work(problems: pa.Table, committed: dict[str, list[int]], k: int) -> list[WorkItem]:
    """The work left, in problem id order (`problems` must be sorted by id)."""
    items = []
    for pid, prompt, answer in zip(problems["id"].to_pylist(), problems["prompt"].to_pylist(),
                                   problems["answer"].to_pylist(), strict=True):
        for first, count in missing_runs(committed.get(pid, []), k):
            items.append(WorkItem(pid, prompt, answer, first, count))
    return items


def chunk_batches(items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Fixed batches of `batch_size` problems (a problem's runs stay in one batch)."""
    batches: list[list[WorkItem]] = []
    problems_in_last = 0
    for item in items:
        if not batches or batches[-1][-1].problem_id != item.problem_id:
            if not batches or problems_in_last >= batch_size:
                batches.append([])
                problems_in_last = 0
            problems_in_last += 1
        batches[-1].append(item)
    return batches


def generate_items(backend, items: list[WorkItem], base: SamplingConfig) -> list[list[Completion]]:
    """Completions of every item, one request per sample (n = 1, the sample's own seed), so a
    sample does not depend on how a backend seeds the i-th of n samples."""
    prompts, seeds = [], []
    for item in items:
        for j in range(item.first, item.first + item.count):
            prompts.append(item.prompt)
            seeds.append(sample_seed(base.seed, item.problem_id, j))
    flat = backend.generate(prompts, replace(base, n=1), seeds=seeds)
    out, at = [], 0
    for item in items:
        out.append([cs[0] for cs in flat[at : at + item.count]])
        at += item.count
    return out


@dataclass(frozen=True)
class RolloutTarget:
    """Where a run's rows are committed and what they are labelled with."""

    folder: Path
    dataset: str
    model_id: str  # the student's (or, for references, the teacher's) id
    sampling_hash: str
    grader: str


def grade_rows(pool, items: list[WorkItem], completions: list[list[Completion]],
               target: RolloutTarget) -> pa.Table:
    """ROLLOUT_SCHEMA rows of a generated batch, graded by `pool`."""
    flat = [(item, item.first + i, c) for item, cs in zip(items, completions,
                                                          strict=True) for i, c in enumerate(cs)]
    verdicts = pool.grade([(c.text, item.answer) for item, _, c in flat])
    rows = len(flat)
    return pa.table({
        "problem_id": [item.problem_id for item, _, _ in flat], "dataset": [target.dataset] * rows,
        "sample_idx": pa.array([j for _, j, _ in flat], pa.int32()),
        "completion": [c.text for _, _, c in flat], "outcome": [str(v.outcome) for v in verdicts],
        "tokens": pa.array([c.tokens for _, _, c in flat], pa.int32()),
        "finish_reason": [c.finish_reason for _, _, c in flat], "student_id": [target.model_id] * rows,
        "sampling_hash": [target.sampling_hash] * rows, "grader": [v.grader for v in verdicts],
    }, schema=ROLLOUT_SCHEMA)


def select_problems(home: Home, dataset: str, problem_ids=None, limit: int | None = None,
                    shard: Shard = WHOLE) -> pa.Table:
    """The run's problems, sorted by id: the first `limit`, or exactly `problem_ids`; of those,
    the ones `shard` owns."""
    table = read_problems(home, dataset)  # sorted by id
    if problem_ids is not None:
        wanted = set(problem_ids)
        unknown = wanted - set(table["id"].to_pylist())
        if unknown:
            raise InputError(f"{len(unknown)} problem ids are not in data set {dataset!r}, e.g. "
                             f"{sorted(unknown)[:3]}", detail={"field": "problem_ids"})
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table["id"], pa.array(sorted(wanted), pa.string())))
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be >= 1, got {limit}")
        table = table.slice(0, limit)
    if not shard.whole:
        table = table.filter(pa.array([shard.owns(pid) for pid in table["id"].to_pylist()], pa.bool_()))
    return table


def run_batches(batches, generate: Callable, commit: Callable, on_commit: Callable) -> None:
    """Generate batch i+1 while batch i is graded and committed (in order) on one writer thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="paced-commit") as writer:
        pending: Future | None = None
        for batch in batches:
            completions = generate(batch)
            if pending is not None:
                on_commit(pending.result())
            pending = writer.submit(commit, batch, completions)
        if pending is not None:
            on_commit(pending.result())


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="problem", desc="rollout", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def resolve_model_id(model_dir: str | Path | None, given: str | None, what: str) -> str:
    """`given`, else the backends' hash of the model files in `model_dir`."""
    if given is None:
        from paced.backends.base import model_id

        if model_dir is None:
            raise InputError(f"give a {what} directory or a {what} id")
        given = model_id(model_dir)
    return validate_name(given, f"{what}_id")


def rollout(home: Home | str | Path, student_dir: str | Path | None, dataset: str,
            config: RolloutConfig = RolloutConfig(), *, student_id: str | None = None, problem_ids=None,
            limit: int | None = None, backend=None, backend_name: str | None = None,
            progress: bool = True, shard: Shard = WHOLE, engine: EngineOptions = DEFAULT_ENGINE) -> dict:
    """Roll out what is pending (see the module doc) and return the run's summary.

    `backend`: an already-built backend to use (not closed here); else one is loaded from
    `student_dir` with `backend_name` (None: auto) and `engine`, only if something is pending.
    `problem_ids`: only these problems; `limit`: only the first N by id; `shard`: only the
    problems it owns (of those)."""
    start = time.perf_counter()
    home = home if isinstance(home, Home) else open_home(home, create=False)
    student_id = resolve_model_id(student_dir, student_id, "student")
    target = RolloutTarget(home.rollouts_dir(student_id, config.sampling_hash, dataset), dataset, student_id,
                           config.sampling_hash, dataset_info(home, dataset)["grader"])
    stats = {"samples": 0, "tokens": 0, "batches": 0}
    with folder_lock(target.folder, "rollout", shard):
        problems = select_problems(home, dataset, problem_ids, limit, shard)
        items = pending_work(problems, committed_samples(batch_files(target.folder)), config.k)
        if items:
            write_sampling_config(target.folder, config.record())
            if backend is None:
                with open_backend(backend_name, student_dir, engine) as loaded:
                    _roll(items, target, config, loaded, stats, progress, shard)
            else:
                _roll(items, target, config, backend, stats, progress, shard)
        else:
            print(f"paced rollout: nothing to do: all {problems.num_rows} problems{_of(shard)} already have "
                  f"{config.k} rollouts for {student_id}/{config.sampling_hash}", file=sys.stderr)
        counts = pass_counts(batch_files(target.folder), config.k)
    in_run = set(problems["id"].to_pylist())
    keep = [i for i, pid in enumerate(counts["problem_id"].to_pylist()) if pid in in_run]
    n, correct = (np.asarray(counts[c].to_pylist(), dtype=np.int64)[keep] for c in ("n", "correct"))
    seconds = time.perf_counter() - start
    return {"student_id": student_id, "sampling_hash": config.sampling_hash, "dataset": dataset,
            "k": config.k, "round": config.round, "shard": str(shard), "problems": problems.num_rows,
            "rolled_out": len({i.problem_id for i in items}), "samples": stats["samples"],
            "tokens": stats["tokens"], "batches": stats["batches"], "seconds": round(seconds, 3),
            "samples_per_second": round(stats["samples"] / seconds, 2),
            "tokens_per_second": round(stats["tokens"] / seconds, 2), "already_done": not items,
            "pass_rates": passrate_summary(np.divide(correct, np.maximum(n, 1)), n)}


def _of(shard: Shard) -> str:
    return "" if shard.whole else f" of shard {shard}"


def _roll(items: list[WorkItem], target: RolloutTarget, config: RolloutConfig, backend, stats: dict,
          progress: bool, shard: Shard = WHOLE) -> None:
    """Generate, grade and commit the batches, with a progress bar."""
    from paced.grading import GradingPool

    base = config.sampling(1)
    with GradingPool(target.grader, config.grader_workers, config.grading_timeout_seconds) as pool, \
            progress_bar(len({i.problem_id for i in items}), progress) as bar:
        t0 = time.perf_counter()

        def commit(batch, completions):
            table = grade_rows(pool, batch, completions, target)
            write_rollout_batch(target.folder, table, shard)
            return batch, table

        def on_commit(done):
            batch, table = done
            stats["samples"] += table.num_rows
            stats["tokens"] += int(sum(table["tokens"].to_pylist()))
            stats["batches"] += 1
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(len({i.problem_id for i in batch}))
            bar.set_postfix(samples_s=f"{stats['samples'] / elapsed:.1f}",
                            tokens_s=f"{stats['tokens'] / elapsed:.0f}")

        run_batches(chunk_batches(items, config.batch_size), lambda b: generate_items(backend, b, base),
                    commit, on_commit)


def add_sampling_arguments(parser, *, temperature: float = 1.0) -> None:
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat-template", action="store_true", help="render prompts with the chat template")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems (by id)")
    parser.add_argument("--batch-size", type=int, default=256, help="problems per committed batch")
    parser.add_argument("--grader-workers", type=int, default=2)
    parser.add_argument("--grading-timeout", type=float, default=10.0, help="seconds per answer")
    add_shard_argument(parser)
    add_engine_arguments(parser)


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    parser.add_argument("--student", required=True, metavar="MODEL",
                        help="the student model: a folder, or a Hugging Face Hub id (org/name) from the HF "
                             "cache")
    parser.add_argument("--student-id", default=None,
                        help="id to file rollouts under (default: hash of the model files)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("-k", "--k", type=int, default=8, help="rollouts per problem")
    parser.add_argument("--round", type=int, default=0, help="re-probe round (> 0: fresh draws)")
    add_sampling_arguments(parser)
    add_home_argument(parser)


def run(args) -> int:
    config = RolloutConfig(k=args.k, temperature=args.temperature, top_p=args.top_p,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, round=args.round,
                           stop=tuple(args.stop), chat_template=args.chat_template,
                           batch_size=args.batch_size,
                           grader_workers=args.grader_workers, grading_timeout_seconds=args.grading_timeout)
    home = open_home(args.home, create=False)
    summary = rollout(home, args.student, args.dataset, config, student_id=args.student_id, limit=args.limit,
                      backend_name=None if args.backend == "auto" else args.backend,
                      shard=announce_shard(resolve_shard(args.shard), "rollout"), engine=engine_options(args))
    print(json.dumps(summary), file=sys.stdout)
    return 0
