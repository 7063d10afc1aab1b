"""Curriculum runs: build each epoch's manifest from a pass-rate snapshot, materialise its shards,
and hand them out through the lease state machine in `state.py`.

A run pins the snapshot epoch 0 was built from. Each later epoch gets a new order (seed, epoch);
with `follow_snapshots` it also takes its weights from the student's newest snapshot at the time
the epoch starts. The snapshot each epoch used is recorded.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from paced.api.settings import Settings
from paced.api.shardfiles import EpochFiles, epoch_folder, read_epoch, write_epoch
from paced.api.state import Ack, EpochRecord, LeaseOutcome, RunRecord, StateDB
from paced.curriculum import WeightScheme
from paced.errors import InputError, NotFoundError, PacedError
from paced.jobs.manifest import snapshot_manifest
from paced.store.files import TMP_PREFIX
from paced.store.home import Home, validate_name
from paced.store.shards import reference_files
from paced.store.snapshots import list_snapshots, read_snapshot

log = logging.getLogger("paced.api")
RUN_ID_PATTERN = r"^r-[0-9a-f]{12}$"
LEASE_ID_PATTERN = r"^l-[0-9a-f]{16}$"


@dataclass(frozen=True)
class RunConfig:
    """A run as asked for. `snapshot_id` None: the student's newest snapshot at creation."""

    student_id: str
    dataset: str
    scheme: str = "paced"
    alpha: float = 1.0
    beta: float = 1.0
    prior: tuple[float, float] = (1.0, 1.0)
    mode: str = "weighted-loss"
    seed: int = 0
    shard_size: int = 256
    epochs: int = 1
    weight_floor: float = 0.0
    uniform_mix: float = 0.0
    follow_snapshots: bool = False
    num_samples: int | None = None
    snapshot_id: str | None = None
    teacher_id: str | None = None

    def weight_scheme(self) -> WeightScheme:
        return WeightScheme(self.scheme, self.alpha, self.beta, tuple(self.prior), self.weight_floor,
                            self.uniform_mix)

    def validate(self, settings: Settings) -> None:
        for field in ("student_id", "dataset", "snapshot_id", "teacher_id"):
            if getattr(self, field) is not None:
                validate_name(getattr(self, field), field)
        limits = (("shard_size", settings.max_shard_size), ("epochs", settings.max_epochs),
                  ("num_samples", settings.max_num_samples))
        for field, limit in limits:
            value = getattr(self, field)
            if value is not None and not 0 <= value <= limit:
                raise InputError(f"`{field}` must be at most {limit} (a service setting), got {value}",
                                 detail={"field": field, "value": value, "max": limit})
        if self.num_samples is not None and self.mode != "weighted-sample":
            raise InputError("`num_samples` applies only to mode 'weighted-sample'",
                             detail={"field": "num_samples"})
        self.weight_scheme()  # raises InputError naming the field


class _Build:
    """A background epoch build; `error` is what it raised, if anything."""

    def __init__(self, target: Callable[[], None]):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), name="paced-epoch-build", daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as err:  # handed to the requests waiting on this build
            if not isinstance(err, PacedError):
                log.exception("epoch build failed")
            self.error = err


def sweep_unfinished(home: Home) -> int:
    """Remove epoch folders a killed service left half-written (`.tmp-*`); returns how many."""
    count = 0
    for path in (home.service_dir / "runs").glob(f"*/{TMP_PREFIX}*"):
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
        self._build_lock = threading.Lock()  # one epoch materialised at a time
        self._builds: dict[tuple[str, int], _Build] = {}
        self._builds_lock = threading.Lock()
        sweep_unfinished(home)
        self._epochs: dict[tuple[str, int], EpochFiles] = {}

    def open(self) -> None:
        self.state.open()

    def close(self) -> None:
        self.state.close()

    def _build_epoch(self, run_id: str, config: RunConfig, epoch: int, snapshot_id: str) -> EpochFiles:
        manifest, snapshot_id = snapshot_manifest(
            self.home, config.student_id, config.dataset, config.weight_scheme(), config.seed, epoch,
            config.mode, snapshot_id, config.num_samples)
        if epoch == 0 and manifest.num_items == 0:
            raise InputError(f"no problem of {config.dataset!r} has a positive weight under scheme "
                             f"{config.scheme!r} in snapshot {snapshot_id}; try weight_floor or uniform_mix",
                             detail={"field": "scheme", "value": config.scheme})
        return write_epoch(self.home, run_id, manifest, snapshot_id, config.dataset, config.shard_size,
                           config.teacher_id)

    @staticmethod
    def _record(files: EpochFiles) -> EpochRecord:
        return EpochRecord(files.epoch, files.snapshot_id, files.items, files.shards, files.shard_size,
                           files.effective_sample_size)

    def create_run(self, config: RunConfig) -> tuple[RunRecord, EpochFiles]:
        config.validate(self.settings)
        if config.teacher_id and not reference_files(self.home, config.dataset, config.teacher_id):
            raise NotFoundError(f"teacher {config.teacher_id!r} has no references for {config.dataset!r}",
                                detail={"field": "teacher_id", "value": config.teacher_id})
        run_id = new_run_id()
        files = self._build_epoch(run_id, config, 0, config.snapshot_id)
        resolved = RunConfig(**{**asdict(config), "snapshot_id": files.snapshot_id})
        record = RunRecord(run_id, self.clock(), config.student_id, config.dataset, files.snapshot_id,
                           asdict(resolved), config.epochs, 0)
        self.state.insert_run(record, self._record(files))
        self._epochs[(run_id, 0)] = files
        return record, files

    def _next_snapshot(self, config: RunConfig, previous: str) -> str:
        """The snapshot a new epoch uses: the newest one if the run follows snapshots and it has
        pass rates for the run's data set, else the previous epoch's."""
        if config.follow_snapshots:
            for snapshot_id in reversed(list_snapshots(self.home, config.student_id)):
                if snapshot_id <= previous:
                    break
                if read_snapshot(self.home, config.student_id, snapshot_id, dataset=config.dataset).num_rows:
                    return snapshot_id
        return previous

    def _build_next(self, run_id: str, epoch: int) -> None:
        with self._build_lock:
            run = self.state.get_run(run_id)
            if run.current_epoch >= epoch:
                return  # built already
            config = RunConfig(**run.config)
            previous = self.epoch_files(run_id, run.current_epoch).snapshot_id
            files = self._build_epoch(run_id, config, epoch, self._next_snapshot(config, previous))
            self.state.add_epoch(run_id, self._record(files))

    def _advance(self, run_id: str, epoch: int) -> bool:
        """Build `epoch` on a background thread (one per run and epoch) and wait for it a little:
        True once it is the run's current epoch, False while it is still being built."""
        key = (run_id, epoch)
        with self._builds_lock:
            build = self._builds.get(key)
            if build is None:
                build = self._builds[key] = _Build(lambda: self._build_next(run_id, epoch))
        build.thread.join(self.settings.epoch_build_wait_seconds)
        if build.thread.is_alive():
            return False
        with self._builds_lock:
            self._builds.pop(key, None)  # a failed build is tried again by the next request
        if build.error is not None:
            raise build.error
        return True

    def lease(self, run_id: str, consumer: str, ttl_seconds: float | None) -> LeaseOutcome:
        ttl = self.settings.lease_ttl_seconds if ttl_seconds is None else ttl_seconds
        if not 0 < ttl <= self.settings.max_lease_ttl_seconds:
            raise InputError(f"`ttl_seconds` must be in (0, {self.settings.max_lease_ttl_seconds}], got {ttl}",
                             detail={"field": "ttl_seconds", "value": ttl})
        while True:  # each pass either returns or moves the run to a later epoch (bounded by epochs)
            outcome = self.state.lease(run_id, consumer, ttl)
            if outcome.status == "next_epoch":
                if self._advance(run_id, outcome.next_epoch):
                    continue
                return LeaseOutcome("wait", retry_after_seconds=min(1.0, self.settings.retry_after_seconds))
            if outcome.status == "wait":
                wait = min(max(outcome.retry_after_seconds, 0.05), self.settings.retry_after_seconds)
                return LeaseOutcome("wait", retry_after_seconds=round(wait, 3))
            return outcome

    def ack(self, run_id: str, lease_id: str) -> Ack:
        return self.state.ack(run_id, lease_id)

    def epoch_files(self, run_id: str, epoch: int) -> EpochFiles:
        """The files of an epoch the run has started (404 for a later one)."""
        files = self._epochs.get((run_id, epoch))
        if files is not None:
            return files
        run = self.state.get_run(run_id)
        if not 0 <= epoch <= run.current_epoch:
            raise NotFoundError(f"run {run_id} has not started epoch {epoch} (current: {run.current_epoch})",
                                detail={"field": "epoch", "value": epoch})
        files = read_epoch(epoch_folder(self.home, run_id, epoch))
        if len(self._epochs) > 4096:
            self._epochs.clear()
        self._epochs[(run_id, epoch)] = files
        return files

    def describe(self, run_id: str) -> dict:
        run = self.state.get_run(run_id)
        progress = self.state.progress(run_id)
        last = progress[-1]
        done = run.current_epoch == run.epochs - 1 and last["acked"] == last["shards"]
        return {"run": run, "progress": progress, "done": done}
