"""Distil a teacher into a student on weighted shards: `paced train`.

    paced train --student DIR --teacher DIR --from URL_OR_DIR --out DIR \\
        [--loss forward|reverse|jsd|akl --steps N | --stages forward:300,reverse:300] \\
        [--lr 1e-4 --batch-size 8 --grad-accum 1 --warmup-steps 0 --save-every N --resume]

--from is a manifest folder (`paced manifest build --out DIR`: its shards are read in order,
epoch after epoch) or a run of the service (http://HOST:PORT/v1/runs/RUN: lease a shard, train
on it, ack it after the step that used its last row; --token or $PACED_TOKEN).

Off-policy stages (forward, jsd, akl by default) train on the shard's reference completions,
on-policy stages (reverse by default; --on-policy for all) on one sample per prompt from the
current student. Each problem's loss is weighted by the shard row's `weight`. Checkpoints go to
OUT/checkpoint-STEP and OUT/final (save_pretrained + trainer_state.json); --resume continues
from the newest one: from shard files to the same result as an uninterrupted run (the checkpoint
holds the epoch, shard and row to go on from); from the service by leasing anew (a shard the
killed trainer held but had not acked is served again once its lease expires, so keep
--lease-ttl-seconds short). Under `torchrun`, every process trains on its own batches (files:
every world-size-th batch of the one stream; service: its own leases); rank 0 saves.

Pass rates measured while training (--home: the data home, the service's when --from is a run):
--refresh-every N: every N steps, save OUT/checkpoint-N, roll it out on the problems that can
have moved (every 0 < p < 1, plus a rotating --reprobe-fraction of p in {0, 1}; 1.0: all),
write the next snapshot of the student's lineage (the manifest's or run's student id: fresh
rows from this checkpoint, the rest carried with their stale age) and go on with its weights:
files → OUT/manifest-stepN (--scheme/--alpha/--beta/--prior/--weight-floor/--uniform-mix
override the manifest's weights here and from step 0); service → the run, created with
follow_snapshots: true, re-plans the rest of its epoch from the new snapshot at the next shard
it hands out. --refresh-between-stages: the same with all problems after each stage but the
last; the next stage trains on a new
lineage named by the checkpoint (OUT/manifest-stageK, or a new run like the old one). Rollouts
use the base snapshot's sampling (--rollout-k, --rollout-temperature, --rollout-max-new-tokens
override it) on --refresh-backend. A kill during a refresh resumes into it (--resume).
--carry-over-decay λ (with --refresh-every): keep each problem's evidence across refreshes as
discounted counts (old × λ + --fresh-samples fresh ones, default 4), re-probing settled problems
(p in {0, 1}) with a chance 1−(1−r)^(age+1) growing with their stale age (r: --reprobe-fraction);
the snapshot records the evidence and its carried share (docs/scale.md).
--eval-every N --eval-dataset NAME: greedy held-out accuracy at step 0 and every N steps, with
cumulative training, generated and rollout tokens and FLOPs (the summary's eval_curve).

On-policy group distillation (the PACED paper's regime; docs/results.md): --group-size [K]
(K = 8 when given alone) samples K completions per prompt from the current student in every
on-policy stage, grades them with the data set's grader (--home), and weights each sample's
loss by w(p̂ = c/K) of its prompt under --group-scheme (paced, hard-filter, uniform,
paced-posterior; --group-alpha/--group-beta/--group-prior); the step's loss is Σ w·L / Σ w over
all its samples (--group-normalize samples: Σ w·L / N, the weights then scale the step), and a
step where every weight is 0 is skipped (counted). The samples are
committed as rollouts of student `{lineage}-{run}-step{s}` in --home, so `paced refresh` makes
snapshots of them. --group-snapshot-every N: every N steps, write the lineage's next snapshot
from them (each problem trained since the last one: its newest group's counts, stale age 0; the
rest carried) and go on with weights from it as --refresh-every does (files: OUT/manifest-stepN;
service: a run with follow_snapshots: true re-plans at its next lease), with no extra generation.
Self-distillation: --teacher set to the student's own starting folder with
--teacher-prompt-template showing the reference answer, e.g. 'Answer: {answer}\\n{prompt}'.

stdout: the summary as one JSON object (steps, losses, train_tokens/train_seconds, the refreshes,
rollout_tokens/rollout_samples/rollout_seconds/refresh_seconds, total_tokens/total_seconds,
generated_tokens and train/sampling/rollout/total_flops, group counts and the sample_students
the group samples were committed under, eval_curve); stderr: a
progress bar and logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from paced.backends.engine import DTYPES
from paced.curriculum import SCHEMES
from paced.errors import InputError, PacedError
from paced.jobs.manifest import add_scheme_arguments, parse_prior, scheme_settings
from paced.jobs.remeasure import REFRESH_BACKENDS, HeldOutConfig, HeldOutEval, RemeasureConfig, RemeasureJob
from paced.trainer.config import DEVICES, GROUP_NORMALIZE, LOSS_PATHS, TrainConfig, parse_stages
from paced.trainer.losses import LOSSES
from paced.trainer.report import parse_report_to

# The configs `paced train` builds from its flags, in --help order. A field of a later one that
# an earlier one already has (seed, --home...) is one flag, given to both.
CONFIGS = (TrainConfig, RemeasureConfig, HeldOutConfig)

# Flags whose spelling, type or action differ from the field's: field -> add_argument kwargs.
SPECIAL = {
    "source": {"flags": ["--from"], "required": True, "metavar": "URL_OR_DIR"},
    "student": {"required": True, "metavar": "MODEL"},
    "teacher": {"required": True, "metavar": "MODEL"},
    "chat_template": {"action": "store_true"},
    "out": {"required": True, "metavar": "DIR"},
    "loss": {"choices": list(LOSSES)},
    "stages": {"type": parse_stages, "metavar": "LOSS:STEPS,..."},
    "on_policy": {"action": argparse.BooleanOptionalAction},
    "resume": {"action": "store_true"},
    "refresh_between_stages": {"action": "store_true"},
    "progress": {"flags": ["--no-progress"], "action": "store_false", "help": "no progress bar"},
    "device": {"choices": list(DEVICES)},
    "token": {"metavar": "TOKEN"},
    "teacher_prompt_template": {"metavar": "TEMPLATE"},
    "loss_chunk_size": {"type": int},
    "loss_path": {"choices": list(LOSS_PATHS)},
    "loss_in_place": {"action": "store_true"},
    "fsdp": {"action": "store_true"},
    "lease_ttl_seconds": {"type": float},
    "refresh_backend": {"choices": list(REFRESH_BACKENDS)},
    "report_to": {"type": parse_report_to, "action": "extend", "default": None,
                  "metavar": "jsonl|tensorboard|none"},
    "group_size": {"type": int, "nargs": "?", "const": 8, "metavar": "K"},
    "group_scheme": {"choices": sorted(SCHEMES)},
    "group_normalize": {"choices": list(GROUP_NORMALIZE)},
    "group_prior": {"type": parse_prior, "metavar": "A,B"},
    "rollout_temperature": {"type": float},
    "carry_over_decay": {"type": float, "metavar": "λ"},
    "fresh_samples": {"type": int},
    "rollout_max_new_tokens": {"type": int},
    "eval_limit": {"type": int},
    "eval_dataset": {"metavar": "NAME"},
    "tensor_parallel_size": {"type": int},
    "gpu_memory_utilization": {"type": float},
    "dtype": {"choices": list(DTYPES)},
    "max_model_len": {"type": int},
    "enforce_eager": {"action": "store_true"},
}


def add_arguments(parser) -> None:
    seen: set[str] = set()
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            if f.metadata.get("scheme"):
                add_scheme_arguments(parser, defaults=False,
                                     note="files only; default: the --from manifest's")
            elif f.name not in seen:
                _add_field(parser, f)
            seen.add(f.name)


def _add_field(parser, f: dataclasses.Field) -> None:
    spec = dict(SPECIAL.get(f.name, {}))
    flags = spec.pop("flags", ["--" + f.name.replace("_", "-")])
    default = spec.pop("default", f.default if f.default is not dataclasses.MISSING else None)
    if "type" not in spec and "action" not in spec and default is not None and not isinstance(default, str):
        spec["type"] = type(default)
    help_ = spec.pop("help", f.metadata.get("help", ""))
    if not isinstance(default, bool | tuple | type(None)) and "required" not in spec:
        help_ += f" (default: {default})"
    parser.add_argument(*flags, dest=f.name, default=default, help=help_, **spec)


def config_from_args(cls, args):
    """`cls` built from the parsed flags of its fields (those left unset keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def resolve_model_arg(name: str) -> str:
    """A model flag's value as a local folder: a path as given, a Hugging Face Hub id (no such
    local folder) as its snapshot folder in the Hugging Face cache."""
    from paced.backends.base import check_model_dir

    return name if Path(name).expanduser().exists() else str(check_model_dir(name))


def jobs_from_args(args) -> tuple[TrainConfig, RemeasureJob, HeldOutEval]:
    """The trainer's config and the two measuring jobs it is handed."""
    config = config_from_args(TrainConfig, args)
    remeasure = RemeasureConfig(**{**vars(config_from_args(RemeasureConfig, args)),
                                   "weights": scheme_settings(args),
                                   **{k: getattr(config, k) for k in _shared_names(RemeasureConfig)}})
    if config.is_http and remeasure.weights:
        flags = "/--".join(k.replace("_", "-") for k in remeasure.weights)
        raise InputError(f"--{flags}: over the service the weights belong to the run; set them in POST "
                         "/v1/runs (scheme, alpha, beta, prior, weight_floor, uniform_mix)")
    if remeasure.carry_over_decay is not None and not config.refresh_every:
        raise InputError("--carry-over-decay applies to --refresh-every refreshes; add --refresh-every N")
    held_out = dataclasses.replace(config_from_args(HeldOutConfig, args), home=remeasure.home,
                                   seed=config.seed, chat_template=config.chat_template)
    return config, RemeasureJob(remeasure), HeldOutEval(held_out)


def _shared_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("shared")]


def group_io(config: TrainConfig, home: str | None):
    """Grading and the sample sink of --group-size (paced/jobs/group_rollouts.py), or None."""
    if not config.group_size:
        return None
    from paced.jobs.group_rollouts import grading_and_sink
    from paced.trainer.group import GroupIO

    return GroupIO(*grading_and_sink(config, home))


def run(args) -> int:
    from paced.trainer.loop import train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.student, args.teacher = resolve_model_arg(args.student), resolve_model_arg(args.teacher)
    config, remeasure, evaluate = jobs_from_args(args)
    warning = chat_template_mismatch(config, remeasure.config)
    if warning and int(os.environ.get("RANK", "0")) == 0:
        print(f"paced train: warning: {warning}", file=sys.stderr, flush=True)
    io = group_io(config, remeasure.config.home)
    if io is not None and io.sink is not None:  # --group-snapshot-every reads the samples it commits
        remeasure.sample_lineage = io.sink.prefix
    try:
        summary = train(config, remeasure=remeasure, evaluate=evaluate, group_io=io)
    finally:
        if io is not None:
            io.grading.close()
    if int(os.environ.get("RANK", "0")) == 0:
        if io is not None and io.sink is not None:  # where `paced refresh --student` finds the samples
            summary = {**summary, "sample_students": io.sink.students()}
        print(json.dumps(summary), file=sys.stdout, flush=True)
    return 0


def chat_template_mismatch(config: TrainConfig, remeasure: RemeasureConfig) -> str | None:
    """A warning when the snapshot that weights the data was measured on prompts rendered
    differently (with or without the chat template) than `--chat-template` trains on."""
    from paced.jobs.remeasure import get_run, is_http
    from paced.store.files import read_json
    from paced.store.home import open_home
    from paced.store.snapshots import measured_chat_template

    if is_http(config.source):
        view = get_run(config.source, {**remeasure.http(), "retries": config.http_retries})
        student, snapshot, measured = view["config"]["student_id"], view["snapshot_id"], None
    else:
        path = Path(config.source) / "manifest.json"
        info = read_json(path) if path.is_file() else {}
        if "inputs" not in info:  # shards written by hand: nothing recorded to compare with
            return None
        student, snapshot = info["inputs"]["student_id"], info["inputs"]["snapshot_id"]
        measured = info.get("measured_with_chat_template")
    if measured is None:
        try:
            measured = measured_chat_template(open_home(remeasure.home, create=False), student, snapshot)
        except PacedError:  # no data home here (a remote service): nothing recorded to compare with
            measured = None
    if measured is None or measured == config.chat_template:
        return None
    said = "with" if measured else "without"
    fix = "add --chat-template" if measured else "drop --chat-template"
    return (f"snapshot {snapshot} of {student} was measured on prompts rendered {said} the chat template, "
            f"but this run trains {'with' if config.chat_template else 'without'} it: the weights describe "
            f"other prompts than the student is trained on ({fix}, or measure again)")
