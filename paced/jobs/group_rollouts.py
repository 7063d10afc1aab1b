"""The trainer's group samples as rollouts: grading and committing for `paced train --group-size`.

The trainer (paced/trainer/group.py) samples K completions per prompt and asks two things of
the outside world, both wired here by `paced train`'s composition root:

- `HomeGrading`: grade answers with each data set's grader (`dataset.json` in the data home)
  in the killable grading workers (paced/grading/pool.py), one pool per data set, kept open
  for the run.
- `RolloutSink`: commit the graded samples of step s as rollouts of the checkpoint that drew
  them, student id `{lineage}-{run}-step{s}` (the weights of `OUT/checkpoint-s`; the lineage is
  the manifest's or service run's student, e.g. `base`; `run` names the training run by its
  --out folder, `r` + 8 hex digits, so two runs from one lineage and seed never file their
  samples under one id, while a resumed run finds its own). Same store code, schema and atomicity as
  `paced rollout`: `rollouts/{student}/{sampling_hash}/{dataset}/batch-*.parquet`, one file per
  step and data set, written under the folder's lock; the sampling hash and `sampling.json` are
  those of `paced rollout --seed step_seed(seed, s)`, whose sample i of problem P is the same
  draw. A sample already committed (a resumed run replaying a step) is not committed again,
  so a kill at any point and a resume commit every sample exactly once. `paced refresh` turns
  each step's rollouts into that checkpoint's snapshot; `--group-snapshot-every` turns them into
  snapshots of the lineage itself (paced/jobs/sample_lineage.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from paced.backends.base import SamplingConfig
from paced.errors import InputError
from paced.jobs.rollout import RolloutConfig
from paced.store.files import read_json
from paced.store.home import Home, open_home, validate_name
from paced.store.problems import dataset_info
from paced.store.rollouts import (
    ROLLOUT_SCHEMA,
    batch_files,
    committed_samples,
    folder_lock,
    list_rollout_students,
    write_rollout_batch,
    write_sampling_config,
)


class HomeGrading:
    """`Grading` with the data sets' graders of a data home, in worker pools kept for the run."""

    def __init__(self, home: Home, workers: int = 2, timeout_seconds: float = 10.0):
        self.home, self.workers, self.timeout_seconds = home, workers, timeout_seconds
        self._pools: dict = {}

    def grade(self, dataset: str, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if dataset not in self._pools:
            from paced.grading import GradingPool

            pool = GradingPool(dataset_info(self.home, dataset)["grader"], self.workers, self.timeout_seconds)
            self._pools[dataset] = pool.__enter__()
        return [(str(v.outcome), v.grader) for v in self._pools[dataset].grade(items)]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def rollout_config(sampling: SamplingConfig) -> RolloutConfig:
    """The `paced rollout` config whose samples a step's samples are (K does not enter the hash)."""
    return RolloutConfig(temperature=sampling.temperature, top_p=sampling.top_p,
                         max_new_tokens=sampling.max_new_tokens, seed=sampling.seed, stop=sampling.stop,
                         chat_template=sampling.chat_template)


def run_tag(out: str | Path) -> str:
    """The training run's part of its samples' student ids: from its --out folder (a resume
    trains into the same one)."""
    return "r" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]


def sample_set(prefix: str, step: int, sampling: SamplingConfig) -> tuple[str, str]:
    """(student id, sampling hash) that step `step`'s samples are committed under; `prefix` is
    `{lineage}-{run}` (`RolloutSink.prefix`)."""
    return f"{prefix}-step{step}", rollout_config(sampling).sampling_hash


def records_table(records: list, student_id: str, sampling_hash: str) -> pa.Table:
    """ROLLOUT_SCHEMA rows of the trainer's `SampleRecord`s (paced/trainer/group.py)."""
    return pa.table({
        "problem_id": [r.problem_id for r in records], "dataset": [r.dataset for r in records],
        "sample_idx": pa.array([r.sample_idx for r in records], pa.int32()),
        "completion": [r.completion for r in records], "outcome": [r.outcome for r in records],
        "tokens": pa.array([r.tokens for r in records], pa.int32()),
        "finish_reason": [r.finish_reason for r in records], "student_id": [student_id] * len(records),
        "sampling_hash": [sampling_hash] * len(records), "grader": [r.grader for r in records],
    }, schema=ROLLOUT_SCHEMA)


class RolloutSink:
    """`SampleSink` into a data home (see the module doc)."""

    def __init__(self, home: Home, lineage: str, run: str):
        self.home, self.lineage = home, validate_name(lineage, "student_id")
        self.prefix = validate_name(f"{lineage}-{run}", "student_id")
        self.committed = 0  # samples written by this process (replays excluded)

    def student_id(self, step: int) -> str:
        return f"{self.prefix}-step{step}"

    def students(self) -> list[str]:
        """The student ids this run's samples are committed under so far, by step."""
        found = [name for name in list_rollout_students(self.home) if name.startswith(f"{self.prefix}-step")]
        return sorted(found, key=lambda name: int(name.rsplit("-step", 1)[1]))

    def commit(self, step: int, sampling: SamplingConfig, records: list) -> None:
        config = rollout_config(sampling)
        student, _ = sample_set(self.prefix, step, sampling)
        for dataset in sorted({r.dataset for r in records}):
            folder = self.home.rollouts_dir(student, config.sampling_hash, dataset)
            with folder_lock(folder, "trainer's sample commit"):
                have = {(pid, i) for pid, idx in committed_samples(batch_files(folder)).items() for i in idx}
                new = [r for r in records
                       if r.dataset == dataset and (r.problem_id, r.sample_idx) not in have]
                if new:
                    write_sampling_config(folder, config.record())
                    write_rollout_batch(folder, records_table(new, student, config.sampling_hash))
                    self.committed += len(new)


def lineage_of(source: str, token: str | None = None) -> str:
    """The student id a run's samples are filed under: the manifest's (manifest.json inputs) or
    the service run's `student_id`."""
    if source.startswith(("http://", "https://")):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(source, headers=headers, timeout=30.0)
        if response.status_code != 200:
            raise InputError(f"--group-size: cannot read run {source} ({response.status_code}): "
                             f"{response.text[:200]}")
        return response.json()["config"]["student_id"]
    path = Path(source) / "manifest.json"
    inputs = read_json(path).get("inputs") if path.is_file() else None
    if not inputs or not inputs.get("student_id"):
        raise InputError(f"--group-size commits samples under the manifest's student, and {path} names none: "
                         "use a manifest folder from `paced manifest build`")
    return inputs["student_id"]


def grading_and_sink(config, home: str | None) -> tuple[HomeGrading, RolloutSink | None]:
    """Grading and (on rank 0) the sink for a --group-size run: `config` is its TrainConfig,
    `home` the data home (None: $PACED_HOME)."""
    import os

    store = open_home(home, create=False)
    grading = HomeGrading(store, config.grader_workers, config.grading_timeout_seconds)
    token = config.token or os.environ.get("PACED_TOKEN")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    sink = RolloutSink(store, lineage_of(config.source, token), run_tag(config.out)) if rank0 else None
    return grading, sink
