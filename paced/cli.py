"""The `paced` command: explicit subcommands, heavy imports only inside the one that runs.

Each subcommand lives in a module exposing `add_arguments(parser)` and `run(args) -> int`.
`paced --help` imports none of them, so it is instant. Exit codes: 0 ok, 1 a `PacedError`
(printed as one line on stderr), 2 usage. A filesystem error (full disk, read-only filesystem,
permissions) is a `PacedError` too at this boundary: one line with the path and the reason.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from paced import __version__
from paced.errors import PacedError, storage_error

# name -> (module, one-line help). The dict is the registry.
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("paced.jobs.import_problems",
               "import problems (JSONL, Parquet, CSV, a datasets folder, builtin:arithmetic, "
               "builtin:mathematics)"),
    "rollout": ("paced.jobs.rollout", "roll out a student K times per problem and grade the answers"),
    "teacher": ("paced.jobs.teacher", "collect verified teacher reference responses"),
    "refresh": ("paced.jobs.refresh", "aggregate committed rollouts into pass-rate snapshots (cron job)"),
    "passrates": ("paced.jobs.passrates", "show a student's pass-rate snapshot"),
    "manifest": ("paced.jobs.manifest", "build a weighted manifest and its shards as Parquet files"),
    "serve": ("paced.api.serve", "run the curriculum service (FastAPI under uvicorn)"),
    "train": ("paced.jobs.train", "distil a teacher into a student on weighted shards"),
    "evaluate": ("paced.jobs.evaluate", "held-out accuracy by difficulty, and forgetting vs a base model"),
    "tasks": ("paced.tasks.cli",
              "built-in models: the tiny task models (shipped, or trained), the real SmolLM2-135M-Instruct"),
    "diagnose": ("paced.jobs.diagnose",
                 "gradient signal by pass-rate bin: will frontier weighting pay here?"),
    "demo": ("paced.jobs.demo", "run the whole loop on the built-in task"),
}


# Top-level modules of the optional extras -> the extra that installs them (pyproject.toml).
EXTRAS = {"torch": "train", "transformers": "train", "tokenizers": "train", "datasets": "train",
          "math_verify": "train", "matplotlib": "train", "vllm": "vllm", "ray": "ray", "trl": "trl"}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="paced",
        description="Curriculum / data selection for LLM distillation (PACED weighting).",
        epilog=f"commands:\n{lines}\n\nRun `paced COMMAND --help` for a command's options. "
        "Every command takes --home DIR (default: $PACED_HOME or ./paced-data).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"paced {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_parser(name: str):
    """The parser and module of one subcommand (imports that module only)."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"paced {name}", description=(module.__doc__ or help_).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        top = _top_parser().parse_args(argv)
        parser, module = command_parser(top.command)
        args = parser.parse_args(top.args)
        return int(module.run(args) or 0)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    except PacedError as err:
        print(f"paced {argv[0] if argv else ''}: error: {err.message}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # an optional extra this command needs is not installed
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"paced {argv[0] if argv else ''}: error: this command needs {err.name!r}, which is not "
              f"installed: pip install 'paced[{extra}]'", file=sys.stderr)
        return 1
    except OSError as err:  # ENOSPC, EROFS, EACCES…: name the path and the reason, no traceback
        logging.getLogger("paced").debug("filesystem error", exc_info=True)
        print(f"paced {argv[0] if argv else ''}: error: {storage_error(err).message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
