"""Measuring while training: pass-rate refreshes (every N steps, between stages) and held-out evals.

A refresh at step N (rank 0 does the work, every process gets the result):

1. save OUT/checkpoint-N with `pending_refresh` in its trainer_state.json (the normal checkpoint:
   a kill from here on resumes at step N and first finishes this refresh);
2. choose the problems: `select_reprobe(current snapshot, --reprobe-fraction, seed, round)`: every
   0 < p < 1 and a rotating share of p in {0, 1}. Between stages: all of them (a full refresh);
3. roll the checkpoint out on them with the base snapshot's sampling (round r: fresh draws):
   transformers on the in-memory student, or vLLM on the saved folder in a subprocess;
4. `refresh_lineage` writes the new snapshot of the lineage L (fresh rows + carried rows). Every
   N steps L stays the run's student; between stages the new stage starts a lineage named by the
   checkpoint (its first snapshot fully measured on it);
5. point the data at it: files → OUT/manifest-step{N} (between stages: manifest-stage{k}), built
   with the manifest's inputs (or the --scheme/--weight-floor/... overrides) and the next epoch
   number; service, every N steps → nothing: the run (follow_snapshots) takes L's newest snapshot
   at the next shard it hands out (the rest of the epoch is re-planned); service, between stages → a new run like the old one for the new lineage;
6. rewrite checkpoint-N's trainer_state.json: the refresh recorded, no longer pending, the new
   source (weights, optimizer and RNG state as saved in 1).

Resume redoes 2–6 for a pending refresh: the rollout skips committed batches, `refresh_lineage`
is idempotent, the manifest is rebuilt from the same snapshot. The global RNG state is put back
after each refresh and eval, so neither changes the training that follows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from paced.errors import InputError, PacedError
from paced.store.files import read_json
from paced.trainer import checkpoint as ckpt
from paced.trainer.data import open_stream

log = logging.getLogger(__name__)
EVERY, STAGE = "every", "stage"


def refresh_due(config, step: int, stage_end: bool) -> bool:
    """A --refresh-every refresh after optimizer step `step` (never after the last step; at a
    stage's end --refresh-between-stages does it)."""
    return bool(config.refresh_every) and step % config.refresh_every == 0 and step < config.total_steps \
        and not (stage_end and config.refresh_between_stages)


def on_rank0(runtime, work):
    """`work()` on rank 0, its result broadcast to every process."""
    result = [work()] if runtime.rank == 0 else [None]
    if runtime.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(result, src=0)
    return result[0]


# ---------------------------------------------------------------- data sources: manifests and runs


def manifest_inputs(folder: str | Path) -> dict:
    """manifest.json of a manifest folder (what built it: student, data set, scheme, seed...)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file() or "inputs" not in read_json(path):
        raise InputError(f"{path} is missing or has no inputs: refreshes and --scheme/--weight-floor/... need a "
                         "manifest folder from `paced manifest build`")
    return read_json(path)


def rebuild_manifest(home, folder: str | Path, student_id: str, out: Path, *, snapshot_id: str | None = None,
                     epoch: int | None = None, overrides: dict | None = None) -> str:
    """The manifest of `folder` rebuilt from a snapshot of `student_id` (default: its newest),
    with epoch `epoch` (default: the folder's) and `overrides` of its inputs (scheme, alpha,
    beta, prior, weight_floor, uniform_mix), written to `out` (replacing an unfinished one)."""
    import shutil

    from paced.curriculum import WeightScheme
    from paced.jobs.manifest import manifest_record, snapshot_manifest, write_manifest_dir

    built = manifest_inputs(folder)
    i = {"weight_floor": 0.0, "uniform_mix": 0.0, "mode": "weighted-loss", "epoch": 0, **built["inputs"],
         **(overrides or {})}
    i["epoch"] = i["epoch"] if epoch is None else epoch
    scheme = WeightScheme(i["scheme"], i["alpha"], i["beta"], tuple(i["prior"]), i["weight_floor"], i["uniform_mix"])
    manifest, snapshot_id = snapshot_manifest(home, student_id, i["dataset"], scheme, i["seed"], i["epoch"],
                                              i["mode"], snapshot_id)
    if manifest.num_items == 0:
        raise InputError(f"the refreshed pass rates of {student_id} (snapshot {snapshot_id}) leave no problem with "
                         f"a weight > 0 under scheme {i['scheme']!r}; add a guard (--weight-floor, --uniform-mix) "
                         "or use --scheme paced-posterior")
    if out.exists():  # left by an interrupted earlier attempt at this refresh
        shutil.rmtree(out)
    write_manifest_dir(home, manifest, manifest_record(student_id, i["dataset"], snapshot_id, scheme, i["mode"],
                                                       i["seed"], i["epoch"]), out, built["shard_size"])
    return str(out)


def service_call(method: str, url: str, body: dict | None = None, *, token: str | None = None,
                 timeout_seconds: float = 30.0) -> dict:
    """One JSON request to the service; InputError with its message on failure."""
    import httpx

    token = token or os.environ.get("PACED_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url, json=body, headers=headers, timeout=timeout_seconds)
    except httpx.TransportError as err:
        raise InputError(f"cannot reach the service at {url}: {err}") from err
    if response.status_code >= 400:
        raise InputError(f"{method} {url}: the service answered {response.status_code}: {response.text[:300]}")
    return response.json()


def create_run_like(run_url: str, student_id: str, **http) -> str:
    """A new run with the config of `run_url` for `student_id` (newest snapshot); its URL."""
    old = service_call("GET", run_url.rstrip("/"), **http)["config"]
    base = run_url.rstrip("/").split("/v1/runs/")[0]
    created = service_call("POST", f"{base}/v1/runs", {**old, "student_id": student_id, "snapshot_id": None},
                           **http)
    return f"{base}/v1/runs/{created['run_id']}"


# ---------------------------------------------------------------- where the weights come from now


@dataclass(frozen=True)
class Cursor:
    """The snapshot the current data source's weights come from."""

    student_id: str  # the lineage
    snapshot_id: str
    dataset: str


def http_args(config) -> dict:
    return {"token": config.token, "timeout_seconds": config.http_timeout_seconds}


def current_cursor(config, progress) -> Cursor:
    if progress.refreshes:
        last = progress.refreshes[-1]
        return Cursor(last["student_id"], last["snapshot_id"], last["dataset"])
    if config.is_http:
        view = service_call("GET", progress.source, **http_args(config))
        return Cursor(view["config"]["student_id"], view["snapshot_id"], view["config"]["dataset"])
    i = manifest_inputs(progress.source)["inputs"]
    return Cursor(i["student_id"], i["snapshot_id"], i["dataset"])


def check_setup(config, progress) -> None:
    """Fail before training when a refresh or eval could not run later."""
    from paced.store.home import open_home

    if not (config.refresh_every or config.refresh_between_stages or config.eval_every):
        return
    open_home(config.home, create=False)
    if config.refresh_every or config.refresh_between_stages:
        current_cursor(config, progress)  # manifest inputs / the run exist
    if config.refresh_every and config.is_http and not progress.refreshes:
        view = service_call("GET", progress.source, **http_args(config))
        if not view["config"].get("follow_snapshots"):
            raise InputError(f"--refresh-every over the service: run {progress.source} must follow snapshots "
                             "(create it with follow_snapshots: true) to take up the refreshed pass rates")


def starting_source(config, progress) -> None:
    """Files with --scheme/--weight-floor/...: train from OUT/manifest-step0, the --from manifest
    rebuilt with them (same snapshot), unless they change nothing."""
    overrides = config.scheme_overrides()
    if config.is_http or not overrides or progress.step or progress.refreshes:
        return
    inputs = manifest_inputs(progress.source)["inputs"]
    if all(inputs.get(k) == v for k, v in overrides.items()):
        return
    from paced.store.home import open_home

    out = Path(config.out) / "manifest-step0"
    progress.source = rebuild_manifest(open_home(config.home, create=False), progress.source, inputs["student_id"],
                                       out, snapshot_id=inputs["snapshot_id"], overrides=overrides)


# ---------------------------------------------------------------- the refresh


def refresh(t, progress, stream, kind: str, optimizer=None, schedule=None):
    """Steps 1–6 of the module doc (collective); returns the stream to go on with."""
    name, started = f"checkpoint-{progress.step}", time.perf_counter()
    if hasattr(stream.source, "renew"):  # service leases held mid-shard: keep them through the refresh
        stream.source.renew()
    if progress.pending_refresh is None:
        progress.pending_refresh = {"kind": kind, "step": progress.step, "stage": progress.stage,
                                    "round": len(progress.refreshes) + 1}
        ckpt.save(t, progress, name, stream, optimizer, schedule)
    pending = progress.pending_refresh
    rng = ckpt.capture_rng_state()
    record = on_rank0(t.runtime, lambda: run_refresh(t.config, t.runtime, progress, pending, t.raw_student,
                                                     t.tokenizer))
    ckpt.restore_rng_state(rng)
    record["refresh_seconds"] = round(time.perf_counter() - started, 3)
    progress.pending_refresh = None
    progress.refreshes.append(record)
    if pending["kind"] == STAGE:
        progress.stage, progress.stage_step = pending["stage"] + 1, 0
    if record["source"] != progress.source:
        progress.local_rows += stream.skipped_rows
        stream.source.close()
        progress.source, progress.position = record["source"], None
        stream = open_stream(t.config, t.runtime.rank, t.runtime.world_size, progress.source, None)
    ckpt.rewrite_state(t, progress, name, stream)
    return stream


def run_refresh(c, runtime, progress, pending: dict, student, tokenizer) -> dict:
    """Steps 2–5 on rank 0: the refresh's record."""
    from paced.backends.base import model_id
    from paced.curriculum.reprobe import select_reprobe
    from paced.jobs.lineage import read_lineage, refresh_lineage
    from paced.store.home import open_home
    from paced.store.snapshots import read_snapshot

    home = open_home(c.home, create=False)
    kind, step, round_ = pending["kind"], pending["step"], pending["round"]
    cursor = current_cursor(c, progress)
    checkpoint = Path(c.out) / f"checkpoint-{step}"
    checkpoint_id = model_id(checkpoint)
    current = read_snapshot(home, cursor.student_id, cursor.snapshot_id, dataset=cursor.dataset)
    ids = select_reprobe(current, 1.0 if kind == STAGE else c.reprobe_fraction, c.seed, round_).to_pylist()
    config = rollout_config(c, home, cursor, round_)
    rolled = roll(c, runtime, home, checkpoint, checkpoint_id, cursor.dataset, config, ids, student, tokenizer)
    lineage = checkpoint_id if kind == STAGE else cursor.student_id
    snapshot_id = refresh_lineage(home, lineage, checkpoint_id, cursor.dataset, config.sampling_hash,
                                  cursor.snapshot_id, problem_ids=ids, previous_student_id=cursor.student_id,
                                  step=step, sampling=config.record())
    entry = read_lineage(home, lineage, snapshot_id)
    record = {"kind": kind, "step": step, "round": round_, "checkpoint": checkpoint.name,
              "checkpoint_id": checkpoint_id, "student_id": lineage, "snapshot_id": snapshot_id,
              "previous_snapshot_id": cursor.snapshot_id, "dataset": cursor.dataset,
              "sampling_hash": config.sampling_hash, "rerolled": entry["rerolled"], "carried": entry["carried"],
              "stale_age_max": entry["stale_age"]["max"], "stale_age_mean": entry["stale_age"]["mean"],
              "rollout_samples": entry["samples"], "rollout_tokens": entry["tokens"],
              "rollout_seconds": rolled["seconds"], "backend": rolled["backend"]}
    if kind == STAGE:
        record["after_stage"] = pending["stage"]
    record["source"] = next_source(c, home, progress.source, record, pending)
    return record


def next_source(c, home, source: str, record: dict, pending: dict) -> str:
    """Step 5: the data source after the refresh."""
    if c.is_http:
        return create_run_like(source, record["student_id"], **http_args(c)) if pending["kind"] == STAGE else source
    name = f"manifest-stage{pending['stage'] + 1}" if pending["kind"] == STAGE else f"manifest-step{pending['step']}"
    epoch = manifest_inputs(source)["inputs"].get("epoch", 0) + 1
    return rebuild_manifest(home, source, record["student_id"], Path(c.out) / name,
                            snapshot_id=record["snapshot_id"], epoch=epoch, overrides=c.scheme_overrides())


def rollout_config(c, home, cursor: Cursor, round_: int):
    """The base snapshot's sampling (from its side file; else the trainer's), K and round r."""
    from paced.jobs.rollout import RolloutConfig

    side = home.snapshots_dir(cursor.student_id) / f"{cursor.snapshot_id}.json"
    s = (read_json(side).get("sampling") or {}) if side.exists() else {}
    return RolloutConfig(
        k=c.rollout_k, round=round_, batch_size=c.rollout_batch_size, seed=s.get("base_seed", c.seed),
        temperature=c.rollout_temperature if c.rollout_temperature is not None else s.get("temperature",
                                                                                          c.sample_temperature),
        max_new_tokens=c.rollout_max_new_tokens or s.get("max_new_tokens", c.max_new_tokens),
        top_p=s.get("top_p", c.sample_top_p), stop=tuple(s.get("stop") or ()),
        chat_template=bool(s.get("chat_template", False)))


def backend_name(c, runtime) -> str:
    if c.refresh_backend != "auto":
        return c.refresh_backend
    import importlib.util

    on_gpu = runtime.device.startswith("cuda")
    return "vllm" if on_gpu and importlib.util.find_spec("vllm") is not None else "transformers"


def roll(c, runtime, home, checkpoint: Path, checkpoint_id: str, dataset: str, config, ids: list[str], student,
         tokenizer) -> dict:
    """Step 3: roll `checkpoint` out on `ids` (what is committed already is skipped)."""
    from paced.jobs.rollout import rollout

    name = backend_name(c, runtime)
    if name == "vllm":
        return {**vllm_rollout(home, checkpoint, checkpoint_id, dataset, config, ids, c.progress), "backend": name}
    from paced.backends.hf_backend import HFBackend

    backend = HFBackend.from_model(student, tokenizer, batch_size=max(256, config.k))
    with runtime.autocast():
        rolled = rollout(home, checkpoint, dataset, config, student_id=checkpoint_id, problem_ids=ids,
                         backend=backend, progress=c.progress)
    return {**rolled, "backend": name}


def vllm_rollout(home, checkpoint: Path, checkpoint_id: str, dataset: str, config, ids: list[str],
                 progress: bool) -> dict:
    """The rollout in a fresh process (`python -m paced.trainer.refresh`): vLLM's engine starts
    and frees its memory there, next to the trainer's model."""
    request = {"home": str(home.root), "student_dir": str(checkpoint), "student_id": checkpoint_id,
               "dataset": dataset, "config": asdict(config), "problem_ids": ids, "progress": progress,
               "gpu_memory_utilization": free_gpu_share()}
    proc = subprocess.run([sys.executable, "-m", "paced.trainer.refresh"], input=json.dumps(request),
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise PacedError(f"the vLLM rollout of {checkpoint} failed (exit {proc.returncode}); see its log above",
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
    from paced.store.home import open_home
    from paced.store.rollouts import batch_files, committed_samples

    r = json.loads(sys.stdin.read())
    home, config = open_home(r["home"], create=False), RolloutConfig(**r["config"])
    folder = home.rollouts_dir(r["student_id"], config.sampling_hash, r["dataset"])
    todo = pending_work(select_problems(home, r["dataset"], r["problem_ids"]),
                        committed_samples(batch_files(folder)), config.k)
    kwargs = {"gpu_memory_utilization": r["gpu_memory_utilization"]} if r["gpu_memory_utilization"] else {}
    args = (home, r["student_dir"], r["dataset"], config)
    common = {"student_id": r["student_id"], "problem_ids": r["problem_ids"], "progress": r["progress"]}
    if not todo:
        summary = rollout(*args, **common)
    else:
        with load_backend("vllm", r["student_dir"], **kwargs) as backend:
            summary = rollout(*args, backend=backend, **common)
    print(json.dumps(summary), flush=True)
    return 0


# ---------------------------------------------------------------- held-out evals and the callback


def measure(t, progress, stream, on_step=None) -> None:
    """The `on_step` callback, then (every --eval-every steps, once per step) greedy held-out
    accuracy with the cumulative training and rollout tokens (collective)."""
    if on_step is not None:
        on_step(progress.step, t.raw_student, t.tokenizer)
    c = t.config
    if not c.eval_every or progress.step % c.eval_every or any(e["step"] == progress.step for e in progress.evals):
        return
    train_tokens, _ = progress.totals(t.runtime, stream)
    rng, started = ckpt.capture_rng_state(), time.perf_counter()
    entry = on_rank0(t.runtime, lambda: evaluate(t, progress.step))
    ckpt.restore_rng_state(rng)
    progress.evals.append({**entry, "train_tokens": train_tokens,
                           "rollout_tokens": sum(r["rollout_tokens"] for r in progress.refreshes),
                           "seconds": round(time.perf_counter() - started, 3)})


def evaluate(t, step: int) -> dict:
    from paced.backends.hf_backend import HFBackend
    from paced.jobs.evaluate import EvalConfig, evaluate_backend
    from paced.store.home import open_home
    from paced.store.problems import dataset_info, read_problems

    c = t.config
    home = open_home(c.home, create=False)
    problems = read_problems(home, c.eval_dataset)
    problems = problems.slice(0, c.eval_limit) if c.eval_limit else problems
    sets = {c.eval_dataset: (problems, dataset_info(home, c.eval_dataset)["grader"])}
    backend = HFBackend.from_model(t.raw_student, t.tokenizer, batch_size=256)
    config = EvalConfig(k=1, max_new_tokens=c.eval_max_new_tokens, seed=c.seed, sampled=False)
    with t.runtime.autocast():
        greedy = evaluate_backend(backend, sets, config)[c.eval_dataset]["greedy"]
    return {"step": step, "accuracy": greedy["accuracy"], "by_difficulty": greedy["by_difficulty"],
            "problems": greedy["problems"]}


if __name__ == "__main__":
    sys.exit(_vllm_main())
