"""Collect verified teacher reference responses: the targets of forward-KL distillation.

    paced teacher --teacher DIR [--teacher-id ID] --dataset NAME [--tries 4] [-k 1] \\
        [--temperature 1.0] [--max-new-tokens N] [--seed S] [--backend ...] [--limit N] \\
        [--batch-size 256] [--shard RANK/WORLD] [--ray [ADDRESS]] [vLLM engine options] --home DIR

Per problem, up to `--tries` tries, stopping at the first that yields a verified-correct answer:
try 0 is greedy (temperature 0, one sample): the teacher's most likely answer; tries 1.. draw
`-k` samples each at `--temperature` (default 1.0), sample s of try t seeded like rollout
sample (t-1)·k+s of problem P (`derive_seed(S, P) + j`). Of the first successful try, the
first correct sample is kept as the problem's one reference (REFERENCE_SCHEMA, `attempt` = the
try), so each problem has at most one reference and shards are deterministic.

Problems go in id order, `--batch-size` at a time; each batch commits
`references/{dataset}/{teacher}/batch-{seq}.parquet` (correct responses only; skipped when
none) and then `done-{seq}.json` (every id tried, the unsolved ones, the settings). A rerun
skips every problem that is solved or listed as tried, so unsolved problems are not retried
forever; a kill between the two files only means that batch's unsolved problems are tried
again (with the same seeds, so the same result). `--shard RANK/WORLD` (or the Slurm/torchrun
variables) takes only the problems whose id hashes to RANK and tags its files, so shards run at
once on one home and their union is the whole-pool run's references (see `paced rollout`).
stdout: one JSON summary, including the
count and first ids of problems the teacher could not solve.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from paced.backends.engine import DEFAULT_ENGINE, EngineOptions, engine_options, open_backend
from paced.errors import InputError
from paced.jobs.rollout import (
    RolloutTarget,
    WorkItem,
    chunk_batches,
    generate_items,
    progress_bar,
    resolve_model_id,
    select_problems,
)
from paced.store.home import Home, open_home
from paced.store.partition import WHOLE, Shard, announce_shard, resolve_shard
from paced.store.problems import dataset_info
from paced.store.rollouts import done_problems, folder_lock, unsolved_problems, write_reference_batch
from paced.store.shards import REFERENCE_SCHEMA


@dataclass(frozen=True)
class TeacherConfig:
    tries: int = 4
    k: int = 1  # samples per sampled try (try 0 is always one greedy sample)
    temperature: float = 1.0  # of tries 1..
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    stop: tuple[str, ...] = ()
    chat_template: bool = False
    batch_size: int = 256
    grader_workers: int = 2
    grading_timeout_seconds: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("tries", "k", "batch_size", "grader_workers"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be >= 1, got {getattr(self, name)}", detail={"field": name})
        self.sampling(1)

    def sampling(self, attempt: int):
        from paced.backends.base import SamplingConfig

        return SamplingConfig(n=1, temperature=0.0 if attempt == 0 else self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed, stop=self.stop,
                              chat_template=self.chat_template)


def solve_batch(backend, pool, problems: list[WorkItem], config: TeacherConfig) -> tuple[dict, dict]:
    """Try the batch's problems; returns ({id: (response, attempt)}, stats)."""
    solved: dict[str, tuple[str, int]] = {}
    stats = {"samples": 0, "tokens": 0}
    remaining = problems
    for attempt in range(config.tries):
        if not remaining:
            break
        first, count = (0, 1) if attempt == 0 else ((attempt - 1) * config.k, config.k)
        items = [WorkItem(p.problem_id, p.prompt, p.answer, first, count) for p in remaining]
        completions = generate_items(backend, items, config.sampling(attempt))
        flat = [(item, c) for item, cs in zip(items, completions, strict=True) for c in cs]
        verdicts = pool.grade([(c.text, item.answer) for item, c in flat])
        stats["samples"] += len(flat)
        stats["tokens"] += sum(c.tokens for _, c in flat)
        for (item, c), verdict in zip(flat, verdicts, strict=True):
            if verdict.outcome == "correct" and item.problem_id not in solved:
                solved[item.problem_id] = (c.text, attempt)
        remaining = [p for p in remaining if p.problem_id not in solved]
    return solved, stats


def _reference_table(dataset: str, teacher_id: str, solved: dict) -> pa.Table:
    ids = sorted(solved)
    return pa.table({"problem_id": ids, "dataset": [dataset] * len(ids),
                     "teacher_id": [teacher_id] * len(ids), "response": [solved[i][0] for i in ids],
                     "attempt": pa.array([solved[i][1] for i in ids], pa.int32())}, schema=REFERENCE_SCHEMA)


def collect_references(home: Home | str | Path, teacher_dir: str | Path | None, dataset: str,
                       config: TeacherConfig = TeacherConfig(), *, teacher_id: str | None = None,
                       limit: int | None = None, backend=None, backend_name: str | None = None,
                       progress: bool = True, shard: Shard = WHOLE,
                       engine: EngineOptions = DEFAULT_ENGINE) -> dict:
    """Collect references for the problems not yet done (of `shard`); returns the run's summary."""
    start = time.perf_counter()
    home = home if isinstance(home, Home) else open_home(home, create=False)
    teacher_id = resolve_model_id(teacher_dir, teacher_id, "teacher")
    target = RolloutTarget(home.references_dir(dataset, teacher_id), dataset, teacher_id, "",
                           dataset_info(home, dataset)["grader"])
    folder = target.folder
    totals = {"solved": 0, "samples": 0, "tokens": 0, "batches": 0}
    with folder_lock(folder, "teacher job", shard):
        problems = select_problems(home, dataset, None, limit, shard)
        done = done_problems(folder)
        todo = [WorkItem(pid, prompt, answer, 0, 1) for pid, prompt, answer in zip(
            problems["id"].to_pylist(), problems["prompt"].to_pylist(), problems["answer"].to_pylist(),
            strict=True)
            if pid not in done]
        if todo and backend is None:
            with open_backend(backend_name, teacher_dir, engine) as loaded:
                _run(target, todo, config, loaded, totals, progress, shard)
        elif todo:
            _run(target, todo, config, backend, totals, progress, shard)
        else:
            print(f"paced teacher: nothing to do: all {problems.num_rows} problems were tried by "
                  f"{teacher_id}",
                  file=sys.stderr)
        unsolved_all = unsolved_problems(folder)
    in_run = set(problems["id"].to_pylist())
    unsolved = [pid for pid in unsolved_all if pid in in_run]
    return {"teacher_id": teacher_id, "dataset": dataset, "shard": str(shard), "problems": problems.num_rows,
            "tried": len(todo),
            "solved": totals["solved"], "unsolved": len(unsolved), "unsolved_ids": unsolved[:10],
            "samples": totals["samples"], "tokens": totals["tokens"], "batches": totals["batches"],
            "seconds": round(time.perf_counter() - start, 3), "already_done": not todo}


def _run(target: RolloutTarget, todo: list[WorkItem], config: TeacherConfig, backend, totals: dict,
         progress: bool, shard: Shard) -> None:
    """Solve and commit the batches, with a progress bar."""
    from paced.grading import GradingPool

    settings = {"tries": config.tries, "k": config.k, "temperature": config.temperature,
                "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens, "seed": config.seed, "stop": list(config.stop),
                "chat_template": config.chat_template, "grader": target.grader}
    with GradingPool(target.grader, config.grader_workers, config.grading_timeout_seconds) as pool, \
            progress_bar(len(todo), progress) as bar:
        bar.set_description("teacher")
        for batch in chunk_batches(todo, config.batch_size):
            solved, stats = solve_batch(backend, pool, batch, config)
            tried = [p.problem_id for p in batch]
            table = _reference_table(target.dataset, target.model_id, solved)
            write_reference_batch(target.folder, table, tried, [pid for pid in tried if pid not in solved],
                                  REFERENCE_SCHEMA, settings, shard)
            totals["solved"] += len(solved)
            totals["samples"] += stats["samples"]
            totals["tokens"] += stats["tokens"]
            totals["batches"] += 1
            bar.update(len(batch))
            bar.set_postfix(solved=totals["solved"])


def add_arguments(parser) -> None:
    from paced.jobs.rollout import add_sampling_arguments
    from paced.store.home import add_home_argument

    parser.add_argument("--teacher", required=True, metavar="MODEL",
                        help="the teacher model: a folder, or a Hugging Face Hub id (org/name) from the HF "
                             "cache")
    parser.add_argument("--teacher-id", default=None,
                        help="id to file references under (default: hash of the model files)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--tries", type=int, default=4, help="tries per problem: one greedy, then sampled")
    parser.add_argument("-k", "--k", type=int, default=1, help="samples per sampled try")
    add_sampling_arguments(parser)
    add_home_argument(parser)


def run(args) -> int:
    config = TeacherConfig(tries=args.tries, k=args.k, temperature=args.temperature, top_p=args.top_p,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, stop=tuple(args.stop),
                           chat_template=args.chat_template, batch_size=args.batch_size,
                           grader_workers=args.grader_workers, grading_timeout_seconds=args.grading_timeout)
    home = open_home(args.home, create=False)
    summary = collect_references(home, args.teacher, args.dataset, config, teacher_id=args.teacher_id,
                                 limit=args.limit,
                                 backend_name=None if args.backend == "auto" else args.backend,
                                 shard=announce_shard(resolve_shard(args.shard), "teacher"),
                                 engine=engine_options(args))
    print(json.dumps(summary), file=sys.stdout)
    return 0
