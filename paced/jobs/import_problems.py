"""Import problems into the data home: JSONL, Parquet, CSV, a local `datasets` folder
(`save_to_disk`), the built-in task (`builtin:arithmetic`), or DeepMind's school-maths
generators (`builtin:mathematics`, offline; see paced/tasks/mathematics.py).

Columns `prompt` and `answer` are required (rename with --prompt-column/--answer-column); `id`
is optional (default: a content hash of prompt+answer); `difficulty` (an integer in the int32
range) is kept as such; every other column is kept as JSON metadata (nested at most
MAX_METADATA_DEPTH deep). Text must be valid UTF-8; NaN and Infinity are refused anywhere (JSON
cannot store them). All or nothing: on any bad row nothing is written and the error names the
file, the row and the field. Re-importing the same rows is a
no-op; importing more rows adds them.

Examples:
  paced import problems.jsonl --dataset math --grader math
  paced import builtin:arithmetic --n 5000 --seed 0 --dataset arith --holdout 500
  paced import builtin:mathematics --modules arithmetic__add_or_sub,arithmetic__mul \
      --levels easy,medium --per-level 50 --holdout 20 --seed 0 --dataset school
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from paced.errors import InputError
from paced.store.home import open_home, validate_name
from paced.store.problems import GRADERS, PROBLEM_SCHEMA, part_files, read_problems, write_problem_part
from paced.tasks.arithmetic import problem_id

BUILTIN = "builtin:arithmetic"
MATHEMATICS = "builtin:mathematics"
MAX_METADATA_DEPTH = 32
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    answer: str = "answer"
    id: str = "id"
    difficulty: str = "difficulty"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_jsonl(path: Path) -> tuple[list[dict], str]:
    rows = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}: line {line_no}: not valid UTF-8 (byte {err.start + 1} of the "
                                 "line)") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from err
            except ValueError as err:  # NaN / Infinity
                raise InputError(f"{path}: line {line_no}: {err}; write the value as text or leave it "
                                 "out") from err
            except RecursionError as err:
                raise InputError(f"{path}: line {line_no}: JSON nested too deeply") from err
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {line_no}: expected a JSON object")
            rows.append({"__loc": f"line {line_no}", **row})
    return rows, "line"


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise InputError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"]
        return ds.data.table
    except InputError:
        raise
    except Exception as err:  # unreadable file of any kind: name it
        raise InputError(f"{path}: cannot read as {suffix or 'a datasets folder'}: {err}") from err


def read_source(path: Path) -> list[dict]:
    """Rows of a source file as dicts, each with a `__loc` naming its line or row."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
        return _read_jsonl(path)[0]
    if path.is_file() and path.suffix.lower() not in (".parquet", ".csv"):
        raise InputError(f"{path}: unknown format; use .jsonl, .parquet, .csv or a datasets folder")
    offset = 2 if path.suffix.lower() == ".csv" else 1  # CSV: row 1 is the header
    return [{"__loc": f"row {i + offset}", **row} for i, row in enumerate(_read_table(path).to_pylist())]


def _text(row: dict, column: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(column)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{where}: field {column!r} is not valid UTF-8 text (byte {err.start + 1})",
                             detail={"field": column}) from err
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{where}: field {column!r} is missing or empty", detail={"field": column})
        return None
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: field {column!r} must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: field {column!r} is {value!r}, not a value", detail={"field": column})
    return str(value)


def _difficulty(row: dict, column: str, where: str) -> int | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{where}: field {column!r} must be an integer, got {value!r}",
                         detail={"field": column})
    if not INT32[0] <= value <= INT32[1]:
        raise InputError(f"{where}: field {column!r} must be in {INT32[0]}..{INT32[1]}, got {value}",
                         detail={"field": column})
    return value


def _json_value(value, where: str, key: str, depth: int = 0):
    """Metadata as JSON-safe values: UTF-8 text, finite numbers, nesting at most MAX_METADATA_DEPTH."""
    if depth > MAX_METADATA_DEPTH:
        raise InputError(f"{where}: field {key!r} is nested more than {MAX_METADATA_DEPTH} levels deep",
                         detail={"field": key})
    if isinstance(value, dict):
        return {str(k): _json_value(v, where, key, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where, key, depth + 1) for v in value]
    if isinstance(value, bytes):
        return _text({key: value}, key, where, required=False)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: field {key!r} holds {value!r}, which JSON cannot store",
                         detail={"field": key})
    return value


def _metadata(row: dict, skip: set, where: str) -> str:
    meta = {k: _json_value(v, where, k) for k, v in row.items() if k not in skip}
    return json.dumps(meta, sort_keys=True, default=str, allow_nan=False)


def normalise_rows(rows: list[dict], source: str, cols: Columns) -> pa.Table:
    """Validate rows and turn them into PROBLEM_SCHEMA; duplicates must agree."""
    seen: dict[str, tuple[str, str]] = {}
    out: dict[str, list] = {name: [] for name in PROBLEM_SCHEMA.names}
    for row in rows:
        where = f"{source}: {row['__loc']}"
        prompt, answer = _text(row, cols.prompt, where), _text(row, cols.answer, where)
        pid = _text(row, cols.id, where, required=False) or problem_id(prompt, answer)
        if pid in seen:
            if seen[pid] != (prompt, answer):
                raise InputError(f"{where}: field {cols.id!r}: duplicate id {pid!r} with different content")
            continue
        seen[pid] = (prompt, answer)
        difficulty = _difficulty(row, cols.difficulty, where)
        meta = _metadata(row, {"__loc", cols.prompt, cols.answer, cols.id, cols.difficulty}, where)
        for key, value in (("id", pid), ("prompt", prompt), ("answer", answer), ("difficulty", difficulty),
                           ("metadata", meta)):
            out[key].append(value)
    if not out["id"]:
        raise InputError(f"{source}: no rows to import")
    return pa.table(out, schema=PROBLEM_SCHEMA)


def new_rows(home, dataset: str, table: pa.Table, source: str) -> pa.Table:
    """Rows not yet in the data set; an id already there with different content is an error."""
    if not part_files(home, dataset):
        return table
    existing = read_problems(home, dataset)
    known = dict(zip(existing["id"].to_pylist(),
                     zip(existing["prompt"].to_pylist(), existing["answer"].to_pylist())))
    keep = []
    for i, (pid, prompt, answer) in enumerate(zip(table["id"].to_pylist(), table["prompt"].to_pylist(),
                                                  table["answer"].to_pylist())):
        if pid in known and known[pid] != (prompt, answer):
            raise InputError(f"{source}: id {pid!r} is already in {dataset!r} with different content")
        if pid not in known:
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


def import_table(home, dataset: str, table: pa.Table, grader: str, source: str) -> dict:
    """Commit the new rows of `table`; returns a summary."""
    fresh = new_rows(home, dataset, table, source)
    if fresh.num_rows:
        write_problem_part(home, dataset, fresh, grader, source)
    return {"dataset": dataset, "rows": table.num_rows, "added": fresh.num_rows,
            "already_present": table.num_rows - fresh.num_rows, "grader": grader}


def _builtin_tables(args) -> tuple[pa.Table, pa.Table | None]:
    from paced.tasks.arithmetic import generate_problems

    table = generate_problems(args.n + args.holdout, args.seed, max_digits=args.max_digits,
                              operations=args.operations)
    table = table.append_column("metadata", pa.array(
        [json.dumps({"operation": op}) for op in table["operation"].to_pylist()], pa.string()))
    table = table.drop_columns(["operation"]).select(PROBLEM_SCHEMA.names)
    if args.holdout:
        return table.slice(0, args.n), table.slice(args.n)
    return table, None


def _mathematics_tables(args) -> tuple[pa.Table, pa.Table | None]:
    from paced.tasks.mathematics import MathematicsConfig, generate_mathematics, parse_levels, parse_modules

    config = MathematicsConfig(modules=parse_modules(args.modules), levels=parse_levels(args.levels),
                               per_level=args.per_level, holdout=args.holdout, seed=args.seed)
    return generate_mathematics(config)


def _add_mathematics_arguments(parser) -> None:
    from paced.tasks.mathematics import SUPPORTED_MODULES

    group = parser.add_argument_group(
        f"{MATHEMATICS} options", f"supported modules: {', '.join(SUPPORTED_MODULES)}")
    group.add_argument("--modules", default="arithmetic__add_or_sub",
                       help="comma-separated modules; an area (e.g. 'arithmetic') means all its supported "
                            "ones")
    group.add_argument("--levels", default="easy",
                       help="comma-separated levels: easy, medium, hard (or 1, 2, 3)")
    group.add_argument("--per-level", type=int, default=100, help="training problems per module and level")


def add_arguments(parser) -> None:
    from paced.store.home import add_home_argument

    parser.add_argument("path",
                        help=f"a .jsonl/.parquet/.csv file, a datasets folder, {BUILTIN} or {MATHEMATICS}")
    parser.add_argument("--dataset", required=True, help="name of the data set to import into")
    parser.add_argument("--grader", choices=GRADERS, default=None,
                        help="verifier for this data set (default: numeric for builtin:arithmetic, else "
                             "math)")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--id-column", default="id")
    builtin = parser.add_argument_group(f"{BUILTIN} options")
    builtin.add_argument("--n", type=int, default=5000, help="number of training problems")
    builtin.add_argument("--seed", type=int, default=0)
    builtin.add_argument("--max-digits", type=int, default=4)
    builtin.add_argument("--operations", default="+", help="operations to draw from, e.g. '+' or '+-'")
    builtin.add_argument("--holdout", type=int, default=0,
                         help="also import this many disjoint problems as DATASET-heldout "
                         f"(for {MATHEMATICS}: per module and level)")
    _add_mathematics_arguments(parser)
    add_home_argument(parser)


def check_builtin_args(args) -> None:
    for name, low in (("n", 1), ("holdout", 0), ("max_digits", 1)):
        value = getattr(args, name)
        if value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}",
                             detail={"field": name})
    if not 0 <= args.seed < 2**63:
        raise InputError(f"--seed must be in 0..2**63-1, got {args.seed}", detail={"field": "seed"})


def run(args) -> int:
    validate_name(args.dataset, "dataset")
    if args.path == BUILTIN:
        check_builtin_args(args)
    home = open_home(args.home)
    if args.path in (BUILTIN, MATHEMATICS):
        grader = args.grader or ("numeric" if args.path == BUILTIN else "math")
        train, held = _builtin_tables(args) if args.path == BUILTIN else _mathematics_tables(args)
        summaries = [import_table(home, args.dataset, train, grader, args.path)]
        if held is not None:
            summaries.append(import_table(home, f"{args.dataset}-heldout", held, grader, args.path))
    else:
        path = Path(args.path)
        cols = Columns(args.prompt_column, args.answer_column, args.id_column)
        table = normalise_rows(read_source(path), str(path), cols)
        summaries = [import_table(home, args.dataset, table, args.grader or "math", str(path))]
    for s in summaries:
        print(json.dumps(s), file=sys.stdout)
    return 0
