"""Curriculum runs: build each epoch's manifest from a pass-rate snapshot, materialise its shards,
and hand them out through the lease state machine in `state.py`.

A run pins the snapshot epoch 0 was built from. Each later epoch gets a new order (seed, epoch);
with `follow_snapshots` it also takes its weights from the student's newest snapshot at the time
the epoch starts, and within an epoch a lease that finds a snapshot newer than the plan re-plans
the shards never leased so far from it (`plans.py`): the next shard handed out is the new
plan's. Epochs and re-plans are built on a background thread; a lease request waits for the
build up to `epoch_build_wait_seconds`, then answers `wait`. The snapshot each segment of each
epoch used, and the checkpoints that measured it, are recorded.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import partial

import pyarrow.parquet as pq

from paced.api.plans import (
    EpochPlan,
    build_segment,
    load_plan,
    measured_by,
    remove_segment,
)
from paced.api.settings import Settings
from paced.api.shardfiles import write_epoch
from paced.api.state import Ack, EpochRecord, LeaseOutcome, Renewal, Replan, RunRecord, StateDB
from paced.curriculum import WeightScheme, build_manifest, starvation_warning
from paced.errors import ConflictError, InputError, NotFoundError, PacedError
from paced.store.files import TMP_PREFIX
from paced.store.home import Home, validate_name
from paced.store.shards import reference_files
from paced.store.snapshots import list_snapshots, read_snapshot_rows

log = logging.getLogger("paced.api")
RUN_ID_PATTERN = r"^r-[0-9a-f]{12}$"
LEASE_ID_PATTERN = r"^l-[0-9a-f]{16}$"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A run as asked for. `snapshot_id` None: the student's newest snapshot at creation.

    Its JSON form (the state database, `GET /v1/runs/{id}`'s `config`) is flat, with the
    request's field names: `weights` spreads into scheme, alpha, beta, prior, weight_floor,
    uniform_mix."""

    student_id: str
    dataset: str
    weights: WeightScheme = field(default_factory=WeightScheme)
    mode: str = "weighted-loss"
    seed: int = 0
    shard_size: int = 256
    epochs: int = 1
    follow_snapshots: bool = False
    num_samples: int | None = None
    snapshot_id: str | None = None
    teacher_id: str | None = None

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        return data | self.weights.to_json()

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        """From `to_json`'s form (runs stored by earlier versions have the same keys)."""
        names = {f.name for f in fields(cls)} - {"weights"}
        return cls(**{k: v for k, v in data.items() if k in names}, weights=WeightScheme.from_json(data))

    def validate(self, settings: Settings) -> None:
        for name in ("student_id", "dataset", "snapshot_id", "teacher_id"):
            if getattr(self, name) is not None:
                validate_name(getattr(self, name), name)
        limits = (("shard_size", settings.max_shard_size), ("epochs", settings.max_epochs),
                  ("num_samples", settings.max_num_samples))
        for name, limit in limits:
            value = getattr(self, name)
            if value is not None and not 0 <= value <= limit:
                raise InputError(f"`{name}` must be at most {limit} (a service setting), got {value}",
                                 detail={"field": name, "value": value, "max": limit})
        if self.num_samples is not None and self.mode != "weighted-sample":
            raise InputError("`num_samples` applies only to mode 'weighted-sample'",
                             detail={"field": "num_samples"})


class _Build:
    """A background epoch build; `error` is what it raised, if anything."""

    def __init__(self, target: Callable[[], None]):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), name="paced-epoch-build",
                                       daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as err:  # handed to the requests waiting on this build
            if not isinstance(err, PacedError):
                log.exception("epoch build failed")
            self.error = err


def sweep_unfinished(home: Home) -> int:
    """Remove epoch and segment folders a killed service left half-written (`.tmp-*`); returns
    how many. (A finished segment folder the state database never recorded is replaced when
    that segment is built again.)"""
    count = 0
    runs = home.service_dir / "runs"
    for path in [*runs.glob(f"*/{TMP_PREFIX}*"), *runs.glob(f"*/epoch-*/{TMP_PREFIX}*")]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        count += 1
    return count


def new_run_id() -> str:
    return "r-" + secrets.token_hex(6)


class RunService:
    """Runs over one data home. Thread-safe: endpoints call it from FastAPI's threadpool."""

    def __init__(self, home: Home, settings: Settings, clock: Callable[[], float]):
        self.home, self.settings, self.clock = home, settings, clock
        self.state = StateDB(home.service_dir / "state.duckdb", clock)
        self._build_lock = threading.Lock()  # one epoch or re-plan materialised at a time
        self._builds: dict[tuple, _Build] = {}
        self._builds_lock = threading.Lock()
        sweep_unfinished(home)
        self._plans: dict[tuple[str, int], EpochPlan] = {}
        self._configs: dict[str, RunConfig] = {}
        self._listings: dict[str, tuple[int, int, list[str]]] = {}  # student -> (mtime, listed at, ids)
        self._has_rows: dict[tuple[str, str, str], bool] = {}

    def open(self) -> None:
        self.state.open()

    def close(self) -> None:
        self.state.close()

    def _build_epoch(self, run_id: str, config: RunConfig, epoch: int,
                     snapshot_id: str | None) -> EpochRecord:
        table, snapshot_id = read_snapshot_rows(self.home, config.student_id, snapshot_id, config.dataset)
        manifest = build_manifest(table, config.weights, config.seed, epoch, config.mode, config.num_samples)
        if epoch == 0 and manifest.num_items == 0:
            raise InputError(f"no problem of {config.dataset!r} has a positive weight under scheme "
                             f"{config.weights.name!r} in snapshot {snapshot_id}; try weight_floor or "
                             "uniform_mix",
                             detail={"field": "scheme", "value": config.weights.name})
        warning = starvation_warning(manifest) if epoch == 0 else None
        if warning:
            log.warning("run %s: %s", run_id, warning)
        student_ids, checkpoint_id = measured_by(self.home, config.student_id, snapshot_id, table)
        files = write_epoch(self.home, run_id, manifest, snapshot_id, config.dataset, config.shard_size,
                            config.teacher_id,
                            extra={"student_ids": list(student_ids), "checkpoint_id": checkpoint_id})
        return EpochRecord(files.epoch, files.snapshot_id, files.items, files.shards, files.shard_size,
                           files.effective_sample_size, student_ids, checkpoint_id,
                           (warning,) if warning else ())

    def create_run(self, config: RunConfig) -> tuple[RunRecord, EpochRecord]:
        config.validate(self.settings)
        if config.teacher_id and not reference_files(self.home, config.dataset, config.teacher_id):
            raise NotFoundError(f"teacher {config.teacher_id!r} has no references for {config.dataset!r}",
                                detail={"field": "teacher_id", "value": config.teacher_id})
        run_id = new_run_id()
        epoch0 = self._build_epoch(run_id, config, 0, config.snapshot_id)
        resolved = replace(config, snapshot_id=epoch0.snapshot_id)
        record = RunRecord(run_id, self.clock(), config.student_id, config.dataset, epoch0.snapshot_id,
                           resolved.to_json(), config.epochs, 0)
        self.state.insert_run(record, epoch0)
        return record, epoch0

    def config(self, run_id: str) -> RunConfig:
        """A run's config (immutable, so kept once read); NotFoundError for an unknown run."""
        config = self._configs.get(run_id)
        if config is None:
            config = self._configs[run_id] = RunConfig.from_json(self.state.get_run(run_id).config)
        return config

    def _snapshot_ids(self, student_id: str) -> list[str]:
        """list_snapshots, listed again only when the folder changed. A listing made within 0.1 s
        of the folder's mtime is not trusted (a change in the same clock tick keeps the mtime)."""
        try:
            mtime = self.home.snapshots_dir(student_id).stat().st_mtime_ns
        except FileNotFoundError:
            return []
        cached = self._listings.get(student_id)
        if cached is None or cached[0] != mtime or cached[1] - mtime < 100_000_000:
            cached = self._listings[student_id] = (mtime, time.time_ns(),
                                                   list_snapshots(self.home, student_id))
        return cached[2]

    def _newest_snapshot(self, config: RunConfig, after: str = "") -> str | None:
        """The student's newest snapshot (later than `after`) with pass rates for the run's data set."""
        for snapshot_id in reversed(self._snapshot_ids(config.student_id)):
            if snapshot_id <= after:
                break
            key = (config.student_id, snapshot_id, config.dataset)
            if key not in self._has_rows:
                path = self.home.snapshots_dir(config.student_id) / f"{snapshot_id}.parquet"
                datasets = pq.read_table(path, columns=["dataset"])["dataset"]
                self._has_rows[key] = config.dataset in datasets.unique().to_pylist()
            if self._has_rows[key]:
                return snapshot_id
        return None

    def _build_next(self, run_id: str, epoch: int) -> None:
        with self._build_lock:
            run = self.state.get_run(run_id)
            if run.current_epoch >= epoch:
                return  # built already
            config = self.config(run_id)
            previous = self.epoch_plan(run_id, run.current_epoch).snapshot_id
            newest = self._newest_snapshot(config, previous) if config.follow_snapshots else None
            self.state.add_epoch(run_id, self._build_epoch(run_id, config, epoch, newest or previous))

    def _build_replan(self, replan: Replan) -> None:
        """Build and record a re-plan; if that fails, the epoch goes on with the plan it has."""
        try:
            with self._build_lock:
                plan = self.epoch_plan(replan.run_id, replan.epoch)
                record = build_segment(self.home, self.config(replan.run_id), plan, replan)
            self.state.install_segment(record)
            self._plans.pop((replan.run_id, replan.epoch), None)
        except BaseException as err:
            remove_segment(self.home, replan)
            if not isinstance(err, ConflictError):  # a conflict: shards went out meanwhile; plan again
                log.exception("re-plan %s failed; the epoch keeps its plan", replan)
            self.state.release_replan(replan, decline=not isinstance(err, ConflictError))
            if not isinstance(err, Exception):
                raise

    def _await(self, key: tuple, target: Callable[[], None]) -> bool:
        """Run `target` on a background thread (one per key) and wait for it a little: True once
        it has finished, False while it is still running. Its error is raised here."""
        with self._builds_lock:
            build = self._builds.get(key)
            if build is None:
                build = self._builds[key] = _Build(target)
        build.thread.join(self.settings.epoch_build_wait_seconds)
        if build.thread.is_alive():
            return False
        with self._builds_lock:
            if self._builds.get(key) is build:
                self._builds.pop(key)  # a failed build is tried again by the next request
        if build.error is not None:
            raise build.error
        return True

    def _ttl(self, ttl_seconds: float | None) -> float:
        ttl = self.settings.lease_ttl_seconds if ttl_seconds is None else ttl_seconds
        if not 0 < ttl <= self.settings.max_lease_ttl_seconds:
            raise InputError(f"`ttl_seconds` must be in (0, {self.settings.max_lease_ttl_seconds}], got "
                             f"{ttl}",
                             detail={"field": "ttl_seconds", "value": ttl})
        return ttl

    def lease(self, run_id: str, consumer: str, ttl_seconds: float | None) -> LeaseOutcome:
        ttl = self._ttl(ttl_seconds)
        config = self.config(run_id)
        newest = self._newest_snapshot(config) if config.follow_snapshots else None
        # each pass returns, or moves the run to a later epoch or plan (bounded: `newest` is fixed)
        while True:
            outcome = self.state.lease(run_id, consumer, ttl, newest)
            if outcome.status in ("next_epoch", "replan"):
                if outcome.status == "next_epoch":
                    key = (run_id, outcome.next_epoch)
                    target = partial(self._build_next, run_id, outcome.next_epoch)
                else:
                    key, target = (outcome.replan,), partial(self._build_replan, outcome.replan)
                if self._await(key, target):
                    continue
                return LeaseOutcome("wait", retry_after_seconds=min(1.0, self.settings.retry_after_seconds))
            if outcome.status == "wait":
                wait = min(max(outcome.retry_after_seconds, 0.05), self.settings.retry_after_seconds)
                return LeaseOutcome("wait", retry_after_seconds=round(wait, 3))
            return outcome

    def ack(self, run_id: str, lease_id: str, consumer: str | None = None, force: bool = False) -> Ack:
        return self.state.ack(run_id, lease_id, consumer, force)

    def renew(self, run_id: str, lease_id: str, ttl_seconds: float | None, consumer: str | None = None,
              force: bool = False) -> Renewal:
        return self.state.renew(run_id, lease_id, self._ttl(ttl_seconds), consumer, force)

    def epoch_plan(self, run_id: str, epoch: int, min_segments: int = 1) -> EpochPlan:
        """The plan of an epoch the run has started (404 for a later one), with at least
        `min_segments` segments (a cached plan with fewer is read again)."""
        plan = self._plans.get((run_id, epoch))
        if plan is not None and len(plan.segments) >= min_segments:
            return plan
        run = self.state.get_run(run_id)
        if not 0 <= epoch <= run.current_epoch:
            raise NotFoundError(f"run {run_id} has not started epoch {epoch} (current: {run.current_epoch})",
                                detail={"field": "epoch", "value": epoch})
        plan = load_plan(self.home, run_id, epoch, self.state.segment_starts(run_id, epoch))
        if len(self._plans) > 4096:
            self._plans.clear()
        self._plans[(run_id, epoch)] = plan
        return plan

    def shard_plan(self, run_id: str, epoch: int, shard: int) -> EpochPlan:
        """The plan to serve shard `shard` of `epoch` from. A run that follows snapshots fixes a
        shard when it is first leased (until then a re-plan may change it): 404 before that."""
        if not self.config(run_id).follow_snapshots:
            return self.epoch_plan(run_id, epoch)
        out, segments = self.state.handed_out(run_id, epoch)  # one read: the segments of every shard out
        plan = self.epoch_plan(run_id, epoch, max(1, segments))
        if out <= shard and out < plan.shards:
            raise NotFoundError(
                f"shard {shard} of epoch {epoch} of run {run_id} is not built yet: the run follows "
                f"snapshots, so a shard is planned when it is first leased ({out} so far); ask again later",
                code="shard_not_built", detail={"field": "shard", "value": shard, "handed_out": out})
        return plan

    def describe(self, run_id: str) -> dict:
        run = self.state.get_run(run_id)
        progress = self.state.progress(run_id)
        last = progress[-1]
        done = run.current_epoch == run.epochs - 1 and last["acked"] == last["shards"]
        return {"run": run, "progress": progress, "done": done, "history": self.state.history(run_id)}
