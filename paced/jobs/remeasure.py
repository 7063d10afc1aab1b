"""Re-measuring while training: the pass-rate refresh of a checkpoint, and held-out evals.

`paced train` hands these two jobs to the trainer (`paced/trainer/remeasure.py` defines what it
expects of them and does the collective part: save, call on rank 0, restore RNG, swap data).
A re-measurement at step N, given the saved OUT/checkpoint-N:

1. choose the problems: `select_reprobe(current snapshot, --reprobe-fraction, seed, round)`: every
   0 < p < 1 and a rotating share of p in {0, 1}. With --carry-over-decay λ: `select_fresh` on the
   carried evidence, settled problems re-probed with a chance growing with their stale age, each
   chosen one rolled out --fresh-samples times. Between stages: all of them (a full refresh);
2. roll the checkpoint out on them with the base snapshot's sampling (round r: fresh draws):
   transformers on the in-memory student, or vLLM on the saved folder in a subprocess
   (`python -m paced.jobs.remeasure`);
3. `refresh_lineage` writes the next snapshot of the lineage L (fresh rows + carried rows; with
   carry-over the fresh rows' evidence is λ × the previous + the fresh counts). Every
   N steps L stays the run's student; between stages the new stage starts a lineage named by the
   checkpoint (its first snapshot fully measured on it);
4. point the data at it. Files: OUT/manifest-step{N} (between stages: manifest-stage{k}), built
   with the manifest's inputs (or the --scheme/--weight-floor/... overrides) and the next epoch
   number. Service, every N steps: nothing (the run, which follows snapshots, takes L's newest
   snapshot at the next shard it hands out). Service, between stages: a new run like the old
   one for the new lineage.

Every step is idempotent, so a trainer killed mid-way redoes it on resume: the rollout skips
committed batches, `refresh_lineage` finds the snapshot it wrote, the manifest is rebuilt from
the same snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from paced.backends.engine import EngineOptions
from paced.curriculum import WeightScheme
from paced.curriculum.carryover import CarryOver
from paced.curriculum.weights import JSON_KEYS
from paced.errors import InputError, PacedError
from paced.jobs.manifest import ManifestInputs
from paced.store.files import read_json
from paced.store.home import Home, open_home
from paced.store.snapshots import read_snapshot_record

EVERY, STAGE = "every", "stage"
REFRESH_BACKENDS = ("auto", "transformers", "vllm")


def _flag(text: str, default: Any) -> Any:
    """A field of its own `paced train` flag, with its help text."""
    return field(default=default, metadata={"help": text})


def _shared(default: Any) -> Any:
    """A field the trainer's config already holds under the same name (one flag for both)."""
    return field(default=default, metadata={"shared": True})


def own_fields(config) -> dict:
    """The fields with flags of their own: what trainer_state.json records for --resume checks."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not f.metadata.get("shared")}


@dataclass(frozen=True)
class RemeasureConfig:
    """What a re-measurement is told: where the data home is, how to roll out, how to weigh."""

    home: str | None = _flag("data home for refreshes and evals (default: $PACED_HOME)", None)
    reprobe_fraction: float = _flag("--refresh-every: share of the p=0/p=1 problems re-rolled each refresh, "
                                    "in rotation (every 0<p<1 one always is; 1.0: a full refresh); with "
                                    "--carry-over-decay: the base rate r of re-probing a settled problem of "
                                    "age a with probability 1-(1-r)^(a+1)", 0.1)
    carry_over_decay: float | None = _flag("--refresh-every: carry each problem's evidence across refreshes "
                                           "as discounted counts, old x λ + fresh, for this λ in [0, 1] "
                                           "(default: off, fresh counts replace the old)", None)
    fresh_samples: int | None = _flag("--carry-over-decay: fresh samples per re-probed problem (default 4; "
                                      "--rollout-k stays the samples of a full refresh between stages)", None)
    refresh_backend: str = _flag("refresh rollouts: transformers on the in-memory student, or vllm on the "
                                 "saved checkpoint in a subprocess (auto: vllm on a GPU when installed, else "
                                 "transformers)", "auto")
    rollout_k: int = _flag("refresh rollouts: samples per problem", 8)
    rollout_temperature: float | None = _flag("refresh rollouts: temperature (default: the base snapshot's "
                                              "sampling, else --sample-temperature)", None)
    rollout_max_new_tokens: int | None = _flag("refresh rollouts: longest completion (default: the base "
                                               "snapshot's sampling, else --max-new-tokens)", None)
    rollout_batch_size: int = _flag("refresh rollouts: problems per committed batch", 256)
    tensor_parallel_size: int | None = _flag("vLLM refresh: GPUs per engine (default 1)", None)
    gpu_memory_utilization: float | None = _flag("vLLM refresh: share of GPU memory the engine may take, in "
                                                 "(0, 1] (default: 0.9 × what the trainer leaves free)", None)
    dtype: str | None = _flag("vLLM refresh: auto, float32, float16 or bfloat16 (default: float32 on the "
                              "CPU, auto on a GPU)", None)
    max_model_len: int | None = _flag("vLLM refresh: engine context length (default: the model's)", None)
    enforce_eager: bool | None = _flag("vLLM refresh: no CUDA graphs", None)
    weights: dict = field(default_factory=dict, metadata={
        "help": "weight settings (scheme, alpha, ... by their JSON keys) over the --from manifest's, for the "
                "manifests built from snapshots (files only)", "scheme": True})
    seed: int = _shared(0)
    sample_temperature: float = _shared(1.0)
    sample_top_p: float = _shared(1.0)
    max_new_tokens: int = _shared(64)
    token: str | None = _shared(None)
    http_timeout_seconds: float = _shared(30.0)
    progress: bool = _shared(True)

    def __post_init__(self):
        for name in ("rollout_k", "rollout_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.reprobe_fraction <= 1:
            raise InputError(f"`reprobe_fraction` must be in [0, 1], got {self.reprobe_fraction}")
        if self.fresh_samples is not None and self.carry_over_decay is None:
            raise InputError("--fresh-samples needs --carry-over-decay (without it a refresh rolls out "
                             "--rollout-k)")
        if self.carry_over_decay is not None and not 0 <= self.carry_over_decay <= 1:
            raise InputError(f"`carry_over_decay` must be in [0, 1], got {self.carry_over_decay}")
        if self.fresh_samples is not None and self.fresh_samples < 1:
            raise InputError(f"`fresh_samples` must be >= 1, got {self.fresh_samples}")
        if self.refresh_backend not in REFRESH_BACKENDS:
            raise InputError(f"`refresh_backend` must be one of {', '.join(REFRESH_BACKENDS)}, "
                             f"got {self.refresh_backend!r}")
        if self.rollout_temperature is not None and self.rollout_temperature < 0:
            raise InputError(f"`rollout_temperature` must be >= 0, got {self.rollout_temperature}")
        if self.rollout_max_new_tokens is not None and self.rollout_max_new_tokens < 1:
            raise InputError(f"`rollout_max_new_tokens` must be >= 1, got {self.rollout_max_new_tokens}")
        unknown = sorted(set(self.weights) - set(JSON_KEYS))
        if unknown:
            raise InputError(f"`weights` takes {', '.join(JSON_KEYS)}, got {', '.join(unknown)}")
        WeightScheme.from_json(self.weights)  # each setting given is valid (InputError naming it)
        engine = self.engine()  # validates the vLLM options
        if self.refresh_backend == "transformers":
            engine.backend_kwargs("transformers")  # vLLM options for a transformers refresh: an error

    def carry_over(self) -> CarryOver | None:
        """The carry-over settings of --refresh-every refreshes (None: off)."""
        if self.carry_over_decay is None:
            return None
        fresh = 4 if self.fresh_samples is None else self.fresh_samples
        return CarryOver(decay=self.carry_over_decay, fresh=fresh, reprobe_rate=self.reprobe_fraction)

    def engine(self) -> EngineOptions:
        """The vLLM engine options of the refresh rollouts (validated)."""
        return EngineOptions(tensor_parallel_size=self.tensor_parallel_size,
                             gpu_memory_utilization=self.gpu_memory_utilization, dtype=self.dtype,
                             max_model_len=self.max_model_len, enforce_eager=self.enforce_eager)

    def weighed(self, scheme: WeightScheme) -> WeightScheme:
        """`scheme` with the settings given here put over it."""
        return WeightScheme.from_json({**scheme.to_json(), **self.weights})

    def http(self) -> dict:
        return {"token": self.token, "timeout_seconds": self.http_timeout_seconds}


# ---------------------------------------------------------------- data sources: manifests and runs


def read_manifest_inputs(folder: str | Path) -> tuple[ManifestInputs, dict]:
    """What built a manifest folder (its manifest.json's inputs), and the whole manifest.json."""
    path = Path(folder) / "manifest.json"
    built = read_json(path) if path.is_file() else {}
    if "inputs" not in built:
        raise InputError(f"{path} is missing or has no inputs: refreshes and --scheme/--weight-floor/... "
                         "need a manifest folder from `paced manifest build`")
    return ManifestInputs.from_json(built["inputs"], str(path)), built


def rebuild_manifest(home: Home, folder: str | Path, student_id: str, out: Path, *,
                     snapshot_id: str | None = None,
                     epoch: int | None = None, weights: WeightScheme | None = None) -> str:
    """The manifest of `folder` rebuilt from a snapshot of `student_id` (default: its newest),
    with epoch `epoch` (default: the folder's) and `weights` (default: the folder's), written
    to `out` (replacing an unfinished one)."""
    from paced.jobs.manifest import ShardForm, snapshot_manifest, write_manifest_dir
    from paced.store.snapshots import measured_chat_template

    built, written = read_manifest_inputs(folder)
    epoch = built.epoch if epoch is None else epoch
    asked = dataclasses.replace(built, student_id=student_id, snapshot_id=snapshot_id,
                                weights=weights or built.weights, epoch=epoch)
    manifest, inputs = snapshot_manifest(home, asked)
    if manifest.num_items == 0:
        raise InputError(f"the refreshed pass rates of {student_id} (snapshot {inputs.snapshot_id}) leave no "
                         f"problem with a weight > 0 under scheme {inputs.weights.name!r}; add a guard "
                         "(--weight-floor, --uniform-mix) or use --scheme paced-posterior")
    if out.exists():  # left by an interrupted earlier attempt at this refresh
        shutil.rmtree(out)
    form = ShardForm(bool(written.get("require_reference")), written.get("form", "text"),
                     # as the folder was written
                     measured_chat_template(home, student_id, inputs.snapshot_id))
    write_manifest_dir(home, manifest, inputs, out, int(written["shard_size"]), form)
    return str(out)


def service_for(url: str, http: dict):
    """A `paced.client.ServiceClient` for the service `url` (a run URL) belongs to."""
    from paced.client import ServiceClient, run_base

    return ServiceClient(run_base(url)[0], token=http.get("token"),
                         timeout_seconds=http.get("timeout_seconds", 30.0), retries=http.get("retries", 5))


def get_run(run_url: str, http: dict) -> dict:
    """The service's view of a run (GET /v1/runs/ID)."""
    service = service_for(run_url, http)
    try:
        return service.get_run(run_url)
    finally:
        service.close()


def create_run_like(run_url: str, student_id: str, **http) -> str:
    """A new run with the config of `run_url` for `student_id` (newest snapshot); its URL."""
    service = service_for(run_url, http)
    try:
        return service.create_run_like(run_url, student_id)
    finally:
        service.close()


def snapshot_frontier(table) -> dict:
    """A snapshot's frontier as the trainer logs it: problems, shares at p̂ = 0 / 0 < p̂ < 1 / p̂ = 1,
    mean p̂ and the mean carried share of its estimates."""
    from paced.curriculum.frontier import compute_frontier

    p, n, age, share = (table[c].to_numpy() for c in ("pass_rate", "n", "stale_age", "carried_share"))
    f = compute_frontier(p, n, age, share)
    return {"problems": f.problems, "share_zero": f.share("zero"), "share_mid": f.share("mid"),
            "share_one": f.share("one"), "mean_pass_rate": f.mean_pass_rate, "carried_share": f.carried_share}


def is_http(source: str) -> bool:
    return source.startswith(("http://", "https://"))


# ---------------------------------------------------------------- where the weights come from now


@dataclass(frozen=True)
class Cursor:
    """The snapshot the current data source's weights come from."""

    student_id: str  # the lineage
    snapshot_id: str
    dataset: str


def current_cursor(config: RemeasureConfig, source: str, previous: dict | None) -> Cursor:
    """The last re-measurement's snapshot, else the one `source` was built from."""
    if previous is not None:
        return Cursor(previous["student_id"], previous["snapshot_id"], previous["dataset"])
    if is_http(source):
        view = get_run(source, config.http())
        return Cursor(view["config"]["student_id"], view["snapshot_id"], view["config"]["dataset"])
    inputs, _ = read_manifest_inputs(source)
    return Cursor(inputs.student_id, inputs.snapshot_id, inputs.dataset)


# ---------------------------------------------------------------- the job


class RemeasureJob:
    """The trainer's `Remeasure` hook: re-measure a checkpoint's pass rates, say where data goes next.

    `sample_lineage`: the prefix the --group-size samples are committed under
    (`{lineage}-{run}`, whose step s is `{lineage}-{run}-step{s}`; `paced train` sets it from
    the sample sink), for `from_samples`."""

    def __init__(self, config: RemeasureConfig, sample_lineage: str | None = None):
        self.config = config
        self.sample_lineage = sample_lineage

    def to_json(self) -> dict:
        """Its settings under the names trainer_state.json has always used (one key per flag)."""
        own = {k: v for k, v in own_fields(self.config).items() if k != "weights"}
        return own | {key: self.config.weights.get(key) for key in JSON_KEYS}

    def check(self, source: str, previous: dict | None, every: bool) -> None:
        """Fail before training when a re-measurement could not run later."""
        open_home(self.config.home, create=False)
        current_cursor(self.config, source, previous)  # manifest inputs / the run exist
        if every and is_http(source) and previous is None:
            view = get_run(source, self.config.http())
            if not view["config"].get("follow_snapshots"):
                raise InputError(f"--refresh-every over the service: run {source} must follow snapshots "
                                 "(create it with follow_snapshots: true) to take up the refreshed "
                                 "pass rates")

    def starting_source(self, source: str, out: Path) -> str:
        """Files with --scheme/--weight-floor/...: OUT/manifest-step0, the `source` manifest
        rebuilt with them (same snapshot), unless they change nothing."""
        if is_http(source) or not self.config.weights:
            return source
        inputs, _ = read_manifest_inputs(source)
        weights = self.config.weighed(inputs.weights)
        if weights == inputs.weights:
            return source
        return rebuild_manifest(open_home(self.config.home, create=False), source, inputs.student_id,
                                Path(out) / "manifest-step0", snapshot_id=inputs.snapshot_id, weights=weights)

    def __call__(self, checkpoint_dir: Path, step: int, kind: str, source: str, *, stage: int, round_: int,
                 previous: dict | None, student, tokenizer, runtime) -> dict:
        """Steps 1–4 of the module doc (rank 0): the re-measurement's record, with the new `source`."""
        from paced.backends.base import model_id
        from paced.jobs.lineage import read_lineage, refresh_lineage
        from paced.store.snapshots import read_snapshot

        config = self.config
        home = open_home(config.home, create=False)
        cursor = current_cursor(config, source, previous)
        checkpoint_id = model_id(checkpoint_dir)
        current = read_snapshot(home, cursor.student_id, cursor.snapshot_id, dataset=cursor.dataset)
        carry = config.carry_over() if kind == EVERY else None
        ids = choose_problems(current, config, carry, kind, round_)
        rollout = rollout_config(config, home, cursor, round_)
        if carry is not None:
            rollout = dataclasses.replace(rollout, k=carry.fresh)
        rolled = roll(config, runtime, home, checkpoint_dir, checkpoint_id, cursor.dataset, rollout, ids,
                      student, tokenizer)
        lineage = checkpoint_id if kind == STAGE else cursor.student_id
        snapshot_id = refresh_lineage(home, lineage, checkpoint_id, cursor.dataset, rollout.sampling_hash,
                                      cursor.snapshot_id, problem_ids=ids,
                                      previous_student_id=cursor.student_id, step=step,
                                      sampling=rollout.record(), decay=carry.decay if carry else None)
        entry = read_lineage(home, lineage, snapshot_id)
        record = {"kind": kind, "step": step, "round": round_, "checkpoint": checkpoint_dir.name,
                  "checkpoint_id": checkpoint_id, "student_id": lineage, "snapshot_id": snapshot_id,
                  "previous_snapshot_id": cursor.snapshot_id, "dataset": cursor.dataset,
                  "sampling_hash": rollout.sampling_hash, "rerolled": entry["rerolled"],
                  "carried": entry["carried"], "stale_age_max": entry["stale_age"]["max"],
                  "stale_age_mean": entry["stale_age"]["mean"],
                  "rollout_samples": entry["samples"], "rollout_tokens": entry["tokens"],
                  "rollout_seconds": rolled["seconds"], "backend": rolled["backend"]}
        if carry is not None:
            record |= {"carry_over_decay": carry.decay, "carried_share_mean": entry["carried_share"]["mean"]}
        fresh = read_snapshot(home, lineage, snapshot_id, dataset=cursor.dataset)
        record["frontier"] = snapshot_frontier(fresh)
        if kind == STAGE:
            record["after_stage"] = stage
        record["source"] = self.next_source(home, checkpoint_dir.parent, source, record, stage)
        return record

    def from_samples(self, checkpoint_dir: Path, step: int, source: str, *, samples: list, round_: int,
                     previous: dict | None) -> dict:
        """--group-snapshot-every (rank 0): the lineage's next snapshot from the training samples of
        `samples` ([(step, SamplingConfig)], paced/jobs/sample_lineage.py), then step 4. No sample
        in the data set (nothing was trained since the last one): no snapshot, the same source."""
        from paced.jobs.group_rollouts import rollout_config as sample_config
        from paced.jobs.group_rollouts import sample_set
        from paced.jobs.lineage import read_lineage
        from paced.jobs.sample_lineage import refresh_lineage_from_samples

        if self.sample_lineage is None:
            raise InputError("--group-snapshot-every needs the lineage the samples are committed under "
                             "(RemeasureJob(..., sample_lineage=...); `paced train` sets it)")
        home = open_home(self.config.home, create=False)
        cursor = current_cursor(self.config, source, previous)
        sets = [sample_set(self.sample_lineage, s, sampling) for s, sampling in samples]
        sampling = sample_config(samples[-1][1]).record() if samples else None
        snapshot_id = refresh_lineage_from_samples(home, cursor.student_id, cursor.dataset, sets,
                                                   cursor.snapshot_id, step=step, sampling=sampling)
        entry = read_lineage(home, cursor.student_id, snapshot_id) if snapshot_id else None
        record = {"kind": "samples", "step": step, "round": round_, "checkpoint": checkpoint_dir.name,
                  "checkpoint_id": entry["checkpoint_id"] if entry else None, "student_id": cursor.student_id,
                  "snapshot_id": snapshot_id or cursor.snapshot_id,
                  "previous_snapshot_id": cursor.snapshot_id,
                  "dataset": cursor.dataset, "sampling_hash": entry["sampling_hash"] if entry else None,
                  "sample_steps": [samples[0][0], samples[-1][0]] if samples else [],
                  "rerolled": entry["rerolled"] if entry else 0, "carried": entry["carried"] if entry else 0,
                  "stale_age_max": entry["stale_age"]["max"] if entry else None,
                  "stale_age_mean": entry["stale_age"]["mean"] if entry else None,
                  "samples": entry["samples"] if entry else 0,
                  "sample_tokens": entry["tokens"] if entry else 0,
                  "rollout_samples": 0, "rollout_tokens": 0, "rollout_seconds": 0.0, "backend": None}
        record["source"] = source
        if entry:
            record["source"] = self.next_source(home, checkpoint_dir.parent, source, record, 0)
        return record

    def next_source(self, home: Home, out: Path, source: str, record: dict, stage: int) -> str:
        """Step 4: the data source after the re-measurement."""
        kind = record["kind"]
        if is_http(source):
            if kind != STAGE:
                return source
            return create_run_like(source, record["student_id"], **self.config.http())
        name = f"manifest-stage{stage + 1}" if kind == STAGE else f"manifest-step{record['step']}"
        inputs, _ = read_manifest_inputs(source)
        return rebuild_manifest(home, source, record["student_id"], out / name,
                                snapshot_id=record["snapshot_id"],
                                epoch=inputs.epoch + 1, weights=self.config.weighed(inputs.weights))


def choose_problems(current, config: RemeasureConfig, carry: CarryOver | None, kind: str,
                    round_: int) -> list[str]:
    """Step 1: the problems to roll out. Between stages all of them; every N steps every
    0 < p < 1 and, of p in {0, 1}, a rotating share (`select_reprobe`) or, with carry-over, each
    with a probability growing with its stale age (`select_fresh`, on the carried evidence)."""
    from paced.curriculum.carryover import select_fresh
    from paced.curriculum.reprobe import select_reprobe

    if carry is None:
        return select_reprobe(current, 1.0 if kind == STAGE else config.reprobe_fraction, config.seed,
                              round_).to_pylist()
    table = current.sort_by("problem_id")
    ids = table["problem_id"].to_pylist()
    chosen = select_fresh(ids, table["evidence_correct"].to_numpy(), table["evidence_n"].to_numpy(),
                          table["stale_age"].to_numpy(), carry.reprobe_rate, config.seed, round_)
    return [pid for pid, keep in zip(ids, chosen, strict=True) if keep]


def rollout_config(config: RemeasureConfig, home: Home, cursor: Cursor, round_: int):
    """The base snapshot's sampling (from its side file; else the trainer's), K and round r."""
    from paced.jobs.rollout import RolloutConfig

    record = read_snapshot_record(home, cursor.student_id, cursor.snapshot_id)
    s = (record.sampling or {}) if record else {}
    temperature = config.rollout_temperature
    if temperature is None:
        temperature = s.get("temperature", config.sample_temperature)
    return RolloutConfig(
        k=config.rollout_k, round=round_, batch_size=config.rollout_batch_size,
        seed=s.get("base_seed", config.seed),
        temperature=temperature,
        max_new_tokens=config.rollout_max_new_tokens or s.get("max_new_tokens", config.max_new_tokens),
        top_p=s.get("top_p", config.sample_top_p), stop=tuple(s.get("stop") or ()),
        chat_template=bool(s.get("chat_template", False)))


def backend_name(config: RemeasureConfig, device: str) -> str:
    if config.refresh_backend != "auto":
        return config.refresh_backend
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if device.startswith("cuda") and has_vllm else "transformers"


def roll(config: RemeasureConfig, runtime, home: Home, checkpoint: Path, checkpoint_id: str, dataset: str,
         rollout_cfg, ids: list[str], student, tokenizer) -> dict:
    """Step 2: roll `checkpoint` out on `ids` (what is committed already is skipped)."""
    from paced.jobs.rollout import rollout

    name = backend_name(config, runtime.device)
    engine = config.engine().backend_kwargs(name)
    if name == "vllm":
        return {**vllm_rollout(home, checkpoint, checkpoint_id, dataset, rollout_cfg, ids,
                               config.progress, engine),
                "backend": name}
    from paced.backends.hf_backend import HFBackend

    backend = HFBackend.from_model(student, tokenizer, batch_size=max(256, rollout_cfg.k))
    with runtime.autocast():
        rolled = rollout(home, checkpoint, dataset, rollout_cfg, student_id=checkpoint_id, problem_ids=ids,
                         backend=backend, progress=config.progress)
    return {**rolled, "backend": name}


def vllm_rollout(home: Home, checkpoint: Path, checkpoint_id: str, dataset: str, config, ids: list[str],
                 progress: bool, engine: dict | None = None) -> dict:
    """The rollout in a fresh process (`python -m paced.jobs.remeasure`): vLLM's engine starts
    and frees its memory there, next to the trainer's model. `engine`: vLLM engine options
    (`gpu_memory_utilization` defaults to 0.9 of the GPU memory the trainer leaves free)."""
    engine = dict(engine or {})
    if "gpu_memory_utilization" not in engine and (share := free_gpu_share()):
        engine["gpu_memory_utilization"] = share
    request = {"home": str(home.root), "student_dir": str(checkpoint), "student_id": checkpoint_id,
               "dataset": dataset, "config": asdict(config), "problem_ids": ids, "progress": progress,
               "engine": engine}
    proc = subprocess.run([sys.executable, "-m", "paced.jobs.remeasure"], input=json.dumps(request),
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise PacedError(f"the vLLM rollout of {checkpoint} failed (exit {proc.returncode}); "
                         "see its log above",
                         code="refresh_failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_gpu_share() -> float | None:
    """The share of GPU memory vLLM may take next to the trainer (None on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return round(max(0.05, 0.9 * free / total), 3)


def _vllm_main() -> int:
    """Roll out one request (JSON on stdin) with vLLM; the summary as JSON on stdout."""
    from paced.backends import load_backend
    from paced.jobs.rollout import RolloutConfig, pending_work, rollout, select_problems
    from paced.store.rollouts import batch_files, committed_samples

    request = json.loads(sys.stdin.read())
    home, config = open_home(request["home"], create=False), RolloutConfig(**request["config"])
    folder = home.rollouts_dir(request["student_id"], config.sampling_hash, request["dataset"])
    todo = pending_work(select_problems(home, request["dataset"], request["problem_ids"]),
                        committed_samples(batch_files(folder)), config.k)
    kwargs = request.get("engine") or {}
    args = (home, request["student_dir"], request["dataset"], config)
    common = {"student_id": request["student_id"], "problem_ids": request["problem_ids"],
              "progress": request["progress"]}
    if not todo:
        summary = rollout(*args, **common)
    else:
        with load_backend("vllm", request["student_dir"], **kwargs) as backend:
            summary = rollout(*args, backend=backend, **common)
    print(json.dumps(summary), flush=True)
    return 0


# ---------------------------------------------------------------- held-out evals


@dataclass(frozen=True)
class HeldOutConfig:
    """What `--eval-every` measures: greedy accuracy on a held-out data set of the home."""

    home: str | None = _shared(None)
    eval_dataset: str | None = _flag("held-out data set in --home for --eval-every", None)
    eval_limit: int | None = _flag("--eval-every: only the first N problems (by id)", None)
    eval_max_new_tokens: int = _flag("--eval-every: longest greedy completion", 16)
    seed: int = _shared(0)
    chat_template: bool = _shared(False)  # the trainer's --chat-template: prompts rendered as in training

    def __post_init__(self):
        if self.eval_limit is not None and self.eval_limit < 1:
            raise InputError(f"`eval_limit` must be >= 1, got {self.eval_limit}")
        if self.eval_max_new_tokens < 1:
            raise InputError(f"`eval_max_new_tokens` must be >= 1, got {self.eval_max_new_tokens}")


class HeldOutEval:
    """The trainer's `Evaluate` hook: greedy held-out accuracy of the in-memory student."""

    def __init__(self, config: HeldOutConfig):
        self.config = config

    def to_json(self) -> dict:
        return own_fields(self.config)

    def check(self) -> None:
        if not self.config.eval_dataset:
            raise InputError("--eval-every needs --eval-dataset (a held-out data set in --home)")
        open_home(self.config.home, create=False)

    def __call__(self, step: int, student, tokenizer, runtime) -> dict:
        from paced.backends.hf_backend import HFBackend
        from paced.jobs.evaluate import EvalConfig, evaluate_backend
        from paced.store.problems import dataset_info, read_problems

        config = self.config
        home = open_home(config.home, create=False)
        problems = read_problems(home, config.eval_dataset)
        problems = problems.slice(0, config.eval_limit) if config.eval_limit else problems
        sets = {config.eval_dataset: (problems, dataset_info(home, config.eval_dataset)["grader"])}
        backend = HFBackend.from_model(student, tokenizer, batch_size=256)
        eval_config = EvalConfig(k=1, max_new_tokens=config.eval_max_new_tokens, seed=config.seed,
                                 sampled=False, chat_template=config.chat_template)
        with runtime.autocast():
            greedy = evaluate_backend(backend, sets, eval_config)[config.eval_dataset]["greedy"]
        return {"step": step, "accuracy": greedy["accuracy"], "by_difficulty": greedy["by_difficulty"],
                "problems": greedy["problems"]}


if __name__ == "__main__":
    sys.exit(_vllm_main())
