"""The built-in models in a data home: installed from the shipped builds, or trained here.

**Installed (the default).** The repository ships one build of each recipe under
`paced/tasks/shipped/{name}/` (safetensors weights, tokenizer, `build.json`), so the demo and the
experiments start from the same weights on every machine: the recipes sit near an edge where a
different CPU's rounding decides whether the teacher learns to carry. `install_model` checks each
shipped file's sha256 against `build.json["files"]` and copies the folder into
`models/{name}`; a home whose copy already has those files is left alone.

**Trained (`--rebuild`).** `build_model` trains the recipe into `models/.tmp-{name}.*`, evaluates
it, checks its accuracy gate (`paced.tasks.gates`), retries with the next seed when the gate is
missed (up to `attempts` seeds, every attempt recorded in `build.json["attempts"]`), writes the
model, tokenizer and `build.json` (recipe, kept seed, seconds, accuracy, pass-rate spread, file
hashes, the gate and its result) and renames the folder into place. A local build whose
`build.json` records the same recipe is reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from paced import __version__
from paced.errors import PacedError
from paced.store.files import read_json, write_json_atomic
from paced.tasks.gates import GATES, AccuracyGate, compute_gate_failures
from paced.tasks.models import build_tokenizer, init_model, save_model
from paced.tasks.pretrain import (
    EVAL_SEED,
    PRETRAIN_DATA_SEED,
    RECIPES,
    ModelRecipe,
    evaluate_model,
    init_from_layers,
    pretrain,
)

BUILD_FILE = "build.json"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """One model folder: where it is, whether it was already there, its build record."""

    name: str
    path: Path
    reused: bool
    record: dict = field(default_factory=dict)
    installed: bool = False  # a copy of the shipped build rather than one trained here


class GateError(PacedError):
    """A build missed its accuracy gate on every seed it was allowed."""

    code = "gate_missed"


# --- files and hashes -------------------------------------------------------------------------


def read_build_record(model_dir: Path) -> dict | None:
    """The `build.json` of a finished build in `model_dir`, or None."""
    path = Path(model_dir) / BUILD_FILE
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_file_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of a model folder except `build.json`, by file name."""
    return {
        p.name: file_sha256(p) for p in sorted(Path(model_dir).iterdir()) if p.is_file()
        and p.name != BUILD_FILE
    }


def verify_files(model_dir: Path, record: dict) -> None:
    """Raise a one-line PacedError naming the first file whose sha256 differs from `record`."""
    expected = record.get("files")
    if not expected:
        raise PacedError(f"{model_dir / BUILD_FILE} records no file hashes; rebuild or reinstall the model")
    for name, sha in sorted(expected.items()):
        path = Path(model_dir) / name
        if not path.is_file():
            raise PacedError(f"{path} is missing (listed in {BUILD_FILE})")
        if file_sha256(path) != sha:
            raise PacedError(f"{path} is damaged: its sha256 differs from the one in {BUILD_FILE}")


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}.", dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- installing the shipped builds ------------------------------------------------------------


def read_shipped_record(recipe: ModelRecipe, shipped_dir: Path = SHIPPED_DIR) -> dict:
    """The shipped build of `recipe`, checked: it exists, matches the recipe, its files hash right."""
    source = Path(shipped_dir) / recipe.name
    record = read_build_record(source)
    if record is None:
        raise PacedError(f"no shipped build of {recipe.name} in {source}; train one with --rebuild")
    if record.get("config") != recipe.to_json():
        raise PacedError(
            f"the shipped {recipe.name} in {source} was built from another recipe than this version's; "
            "train one with --rebuild"
        )
    verify_files(source, record)
    return record


def install_model(
    recipe: ModelRecipe, models_dir: Path, *, force: bool = False, shipped_dir: Path = SHIPPED_DIR
) -> BuildResult:
    """Copy the shipped build of `recipe` into `models_dir/{name}` (kept if already that copy)."""
    shipped = read_shipped_record(recipe, shipped_dir)
    final = Path(models_dir) / recipe.name
    here = read_build_record(final)
    if not force and here is not None and here.get("files") == shipped["files"]:
        try:
            verify_files(final, here)
            return BuildResult(recipe.name, final, reused=True, record=here, installed=True)
        except PacedError as err:
            log.warning("%s; installing the shipped build again", err)
    if here is not None:
        log.info("replacing %s by the shipped %s build (--rebuild keeps local builds)", final, recipe.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}.", dir=final.parent))
    try:
        for name in shipped["files"]:
            shutil.copyfile(Path(shipped_dir) / recipe.name / name, tmp / name)
        record = shipped | {"installed": {"from": "shipped", "paced_version": __version__}}
        verify_files(tmp, record)
        write_json_atomic(tmp / BUILD_FILE, record)  # last: marks the folder complete
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("installed the shipped %s at %s", recipe.name, final)
    return BuildResult(recipe.name, final, reused=False, record=record, installed=True)


# --- training here ----------------------------------------------------------------------------


def _train_once(recipe: ModelRecipe, out_dir: Path, source: BuildResult | None, *, progress: bool) -> dict:
    """Train, evaluate and save one attempt of `recipe` into `out_dir`; its partial record."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    if source is None:
        model = init_model(tokenizer, recipe.size, seed=recipe.pretrain.seed)
    else:
        source_model = AutoModelForCausalLM.from_pretrained(source.path)
        model = init_from_layers(source_model, tokenizer, recipe.size, recipe.keep_layers)
    started = time.perf_counter()
    losses = pretrain(model, tokenizer, recipe.pretrain, progress=progress)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate_model(model, tokenizer, recipe)
    save_model(model, tokenizer, out_dir)
    return {
        "seed": recipe.pretrain.seed, "steps": recipe.pretrain.steps, "seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - started - train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
        "data": {"pretrain_seed": [PRETRAIN_DATA_SEED, recipe.pretrain.seed], "eval_seed": EVAL_SEED},
        "torch_version": torch.__version__, **evaluation,
    }


def _gated_build(
    recipe: ModelRecipe, models_dir: Path, source: BuildResult | None, gate: AccuracyGate | None,
    *, attempts: int, progress: bool,
) -> tuple[Path, dict]:
    """Train seeds seed, seed+1, … until one passes `gate`; its temp folder and record."""
    tried: list[dict] = []
    for attempt in range(attempts):
        seeded = replace(recipe, pretrain=replace(recipe.pretrain, seed=recipe.pretrain.seed + attempt))
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}.", dir=models_dir))
        try:
            record = _train_once(seeded, tmp, source, progress=progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        failures = compute_gate_failures(gate, record["accuracy"]) if gate else []
        tried.append({"seed": record["seed"], "passed": not failures, "failures": failures,
                      "accuracy": record["accuracy"]})
        if not failures:
            return tmp, record | {"attempts": tried}
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s (seed %d) missed its accuracy gate: %s", recipe.name, record["seed"],
                    "; ".join(failures))
    seeds = ", ".join(str(t["seed"]) for t in tried)
    raise GateError(
        f"{recipe.name} missed its accuracy gate with every seed tried ({seeds}; last: "
        f"{'; '.join(tried[-1]['failures'])}); the shipped models are the same on every machine: "
        "run `paced tasks build-models` without --rebuild",
        detail={"attempts": tried},
    )


def build_model(
    recipe: ModelRecipe, models_dir: Path, *, force: bool = False, threads: int = 2, progress: bool = True,
    gate: AccuracyGate | None = None, attempts: int = 3,
) -> BuildResult:
    """Train `recipe` into `models_dir/{name}`, or reuse a local build there of the same recipe.

    `gate` defaults to `GATES[recipe.name]` (none for an unknown name); `attempts` is how many
    seeds to try before giving up with a `GateError`.
    """
    import torch

    if attempts < 1:
        raise PacedError(f"attempts must be >= 1, got {attempts}")
    models_dir = Path(models_dir)
    final = models_dir / recipe.name
    record = read_build_record(final)
    if (record is not None and record.get("config") == recipe.to_json() and not record.get("installed")
            and not force):
        log.info("reusing the local build of %s at %s (build.json matches its recipe)", recipe.name, final)
        return BuildResult(recipe.name, final, reused=True, record=record)
    source = None
    if recipe.init_from is not None:  # the model it starts from: what the home has, else built first
        source = _source_model(recipe.init_from, models_dir, threads=threads, progress=progress,
                               attempts=attempts)
    gate = gate if gate is not None else GATES.get(recipe.name)
    log.info("building %s into %s (%d steps)", recipe.name, final, recipe.pretrain.steps)
    models_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    tmp, record = _gated_build(recipe, models_dir, source, gate, attempts=attempts, progress=progress)
    try:
        record = {
            "name": recipe.name, "config": recipe.to_json(), **record,
            "init_from": source and {"name": source.name, "keep_layers": list(recipe.keep_layers),
                                     "sha256": source.record.get("files", {}).get("model.safetensors")},
            "gate": gate and gate.to_json() | {"passed": True},
            "files": compute_file_hashes(tmp), "threads": threads, "paced_version": __version__,
            "machine": {"cpu": cpu_name(), "system": platform.system()},
        }
        write_json_atomic(tmp / BUILD_FILE, record)  # last: marks the folder complete
        _move_into_place(tmp, final)
        log.info("built %s at %s in %.0f s", recipe.name, final, record["seconds"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(recipe.name, final, reused=False, record=record)


def _source_model(recipe: ModelRecipe, models_dir: Path, **kwargs) -> BuildResult:
    """The model a student starts from: the home's complete copy of it (installed or built), else built."""
    path = models_dir / recipe.name
    record = read_build_record(path)
    if record is not None and record.get("config") == recipe.to_json():
        return BuildResult(recipe.name, path, reused=True, record=record,
                           installed=bool(record.get("installed")))
    return build_model(recipe, models_dir, **kwargs)


def build_models(
    models_dir: Path, *, quick: bool = False, roles: tuple[str, ...] = ("teacher", "student"),
    rebuild: bool = False, force: bool = False, threads: int = 2, progress: bool = True, attempts: int = 3,
) -> dict[str, BuildResult]:
    """The built-in teacher and student (or their `quick-` variants), keyed by role.

    Installed from the shipped builds unless `rebuild`, which trains them here.
    """
    results = {}
    for role in roles:
        recipe = RECIPES[f"quick-{role}" if quick else role]
        if rebuild:
            results[role] = build_model(
                recipe, models_dir, force=force, threads=threads, progress=progress, attempts=attempts
            )
        else:
            results[role] = install_model(recipe, models_dir, force=force)
    return results
