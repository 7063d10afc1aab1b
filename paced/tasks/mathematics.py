"""Real school-maths problems, offline: DeepMind's `mathematics-dataset` 1.0.1 generators.

Saxton et al.'s generators (arithmetic, algebra, numbers, measurement, polynomials,
probability) at three difficulty levels: the package's own train-easy / train-medium /
train-hard split of each module's entropy range, here levels 1, 2, 3. Rows: prompt (the
question), answer (the generator's answer as text), difficulty (the level), and metadata
{"module", "level"}; graded by `math` (math-verify).

Supported modules (`SUPPORTED_MODULES`) are those whose answers are numbers (integers,
decimals, fractions, negatives): for each, every generated answer grades correct against itself
written as `\\boxed{…}`, as "The answer is ….", and in `$…$` (tests/tasks/test_mathematics.py checks
it). Left out, and why:
- answers math-verify cannot compare as the question means them: True/False questions
  (`numbers__is_prime`, `numbers__is_factor`), multiple-choice letters and variable names
  (`comparison__*`), ordered lists (`comparison__sort`), lists of primes read as sets
  (`numbers__list_prime_factors`), clock times (`measurement__time`), digits above 9 in other
  bases (`*_in_base`, `numbers__base_conversion`), sympy-syntax expressions (`x**2`, `sqrt(5)`:
  `algebra__polynomial_roots`, `algebra__sequence_nth_term`, `arithmetic__simplify_surd`,
  `polynomials__simplify_power`);
- generators that fail under numpy 2 (`np.object`, `ndarray.itemset`): `calculus__*` and every
  `polynomials__*` but `evaluate`. The composed modules kept here fail now and then on the same
  calls; such a draw is skipped and the next one taken (deterministic for a seed).

Two repairs, made by `load_modules` (in the generating process only): the package imports a
sympy function from where sympy 1.5 kept it, so that one name is added back first; and
`composition.expand_entities` orders a composed question's statements by shuffling a `set` of
objects hashed by memory address, so the same seed gave different questions in different
processes: it is replaced by the same function over an ordered de-duplicated list (still
uniformly shuffled, so the questions' distribution is unchanged).

Determinism: each (module, level) is generated from Python's and numpy's global generators
seeded from (seed, module, level). The generators also pick variable names from sets, whose
order follows Python's string hashing, so `generate_mathematics` runs them in a child process
with PYTHONHASHSEED=0: the same config gives the same rows in any process. A question is never
repeated: not within a (module, level), not across them, not between training and held-out rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pyarrow as pa

from paced.errors import InputError
from paced.tasks.arithmetic import problem_id

PACKAGE = "mathematics-dataset"
INSTALL_COMMAND = "pip install mathematics-dataset==1.0.1"
LEVELS = {"easy": 1, "medium": 2, "hard": 3}
SUPPORTED_MODULES = (
    "algebra__linear_1d", "algebra__linear_1d_composed", "algebra__linear_2d", "algebra__linear_2d_composed",
    "algebra__sequence_next_term",
    "arithmetic__add_or_sub", "arithmetic__add_sub_multiple", "arithmetic__div", "arithmetic__mixed",
    "arithmetic__mul", "arithmetic__mul_div_multiple", "arithmetic__nearest_integer_root",
    "measurement__conversion",
    "numbers__div_remainder", "numbers__div_remainder_composed", "numbers__gcd", "numbers__gcd_composed",
    "numbers__lcm", "numbers__lcm_composed", "numbers__place_value", "numbers__place_value_composed",
    "numbers__round_number", "numbers__round_number_composed",
    "polynomials__evaluate", "polynomials__evaluate_composed",
    "probability__swr_p_level_set", "probability__swr_p_sequence",
)
MAX_FAILED_DRAWS = 50  # per problem: draws that raised or repeated a question before giving up


@dataclass(frozen=True)
class MathematicsConfig:
    """Which problems to generate: modules x levels, `per_level` of each (+ `holdout`)."""

    modules: tuple[str, ...] = ("arithmetic__add_or_sub",)
    levels: tuple[int, ...] = (1,)
    per_level: int = 100  # training problems per module and level
    holdout: int = 0  # held-out problems per module and level, disjoint from the training ones
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "levels", tuple(self.levels))
        unknown = [m for m in self.modules if m not in SUPPORTED_MODULES]
        if unknown or not self.modules:
            raise InputError(f"unsupported modules {unknown or '(none given)'}; supported: "
                             f"{', '.join(SUPPORTED_MODULES)}", detail={"field": "modules"})
        if not self.levels or any(lv not in LEVELS.values() for lv in self.levels):
            raise InputError(f"levels must be drawn from 1, 2, 3 (easy, medium, hard), got {self.levels}")
        if self.per_level < 1 or self.holdout < 0:
            raise InputError(f"per_level must be >= 1 and holdout >= 0, got {self.per_level}, {self.holdout}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")


def parse_modules(text: str) -> tuple[str, ...]:
    """Comma-separated module names; a bare area (`arithmetic`) means its supported modules."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        matches = [m for m in SUPPORTED_MODULES if m == part or m.startswith(f"{part}__")]
        if not matches:
            raise InputError(f"unknown or unsupported module {part!r}; supported: "
                             f"{', '.join(SUPPORTED_MODULES)}")
        names += [m for m in matches if m not in names]
    if not names:
        raise InputError("--modules names no module")
    return tuple(names)


def parse_levels(text: str) -> tuple[int, ...]:
    """Comma-separated levels: 1, 2, 3 or easy, medium, hard."""
    levels = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        level = LEVELS.get(part) or (int(part) if part.isdigit() else None)
        if level not in LEVELS.values():
            raise InputError(f"unknown level {part!r}; use 1, 2, 3 or easy, medium, hard")
        if level not in levels:
            levels.append(level)
    if not levels:
        raise InputError("--levels names no level")
    return tuple(levels)


@functools.cache
def load_modules() -> dict:
    """`{level: {module name: generator}}` for the supported modules (imports the package)."""
    importlib.import_module("sympy.solvers.diophantine")
    diophantine = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(diophantine, "base_solution_linear"):  # moved in sympy 1.6; the package wants it here
        from sympy.solvers.diophantine.diophantine import base_solution_linear

        diophantine.base_solution_linear = base_solution_linear
    try:
        from mathematics_dataset import generate
        from mathematics_dataset.modules import modules
    except ImportError as err:
        raise InputError(f"builtin:mathematics needs the {PACKAGE!r} package ({err}); install it with: "
                         f"{INSTALL_COMMAND}", code="missing_package") from err
    from mathematics_dataset.util import composition

    composition.expand_entities = _expand_entities_in_order
    out = {}
    for level in LEVELS.values():
        flat = _flatten(modules.train(generate._make_entropy_fn(level - 1, len(LEVELS))))
        out[level] = {name: flat[name] for name in SUPPORTED_MODULES}
    return out


def _expand_entities_in_order(context, **kwargs):
    """`mathematics_dataset.util.composition.expand_entities` (Apache-2.0, DeepMind) with the
    entities de-duplicated in order instead of through a `set`, then shuffled as before."""
    from mathematics_dataset.util.composition import Entity

    kwargs = kwargs.copy()
    entities = list(context.child_entities)
    for key, maybe_entity in kwargs.items():
        if isinstance(maybe_entity, Entity):
            entities.append(maybe_entity)
            kwargs[key] = maybe_entity.handle
    entities = list(dict.fromkeys(entities))
    random.shuffle(entities)
    descriptions = []
    for entity in entities:
        descriptions.append(entity.child_description)
        if not entity.expression_used:
            descriptions.append(entity.description)
    return " ".join(d for d in descriptions if d), kwargs


def _flatten(tree: dict, prefix: str | None = None) -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}__{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Seed Python's and numpy's global generators (the package draws from them); restore after."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def _seed_for(seed: int, module: str, level: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}:{level}".encode()).digest()[:8], "big")


def draw_problems(generator, count: int, seed: int, where: str, seen: set[str]) -> list[tuple[str, str]]:
    """`count` (question, answer) pairs from one generator, deterministic for `seed`, with
    questions not in `seen` (which gains them)."""
    from mathematics_dataset import generate_settings

    out, failed = [], 0
    with seeded_globals(seed):
        while len(out) < count:
            try:
                problem = generator()
                question, answer = str(problem.question).strip(), str(problem.answer).strip()
            except (AttributeError, TypeError, ValueError,
                    ZeroDivisionError):  # numpy-2 breakage (module doc)
                question = answer = ""
            too_long = len(question) > generate_settings.MAX_QUESTION_LENGTH or \
                len(answer) > generate_settings.MAX_ANSWER_LENGTH
            if not question or not answer or too_long or question in seen:
                failed += 1
                if failed > MAX_FAILED_DRAWS * count:
                    raise InputError(f"{where}: could draw only {len(out)} distinct problems of {count}")
                continue
            seen.add(question)
            out.append((question, answer))
    return out


def generate_mathematics(config: MathematicsConfig) -> tuple[pa.Table, pa.Table | None]:
    """Training rows (and held-out rows, if `config.holdout`) as PROBLEM_SCHEMA tables,
    generated in a child process with a fixed hash seed (see the module doc)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONWARNINGS": "ignore"}
    child = subprocess.run([sys.executable, "-m", "paced.tasks.mathematics"], env=env, capture_output=True,
                           input=json.dumps(dataclasses.asdict(config)).encode())
    if child.returncode != 0:
        lines = child.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise InputError(f"builtin:mathematics: {lines[-1]}", code="generator_failed")
    with pa.ipc.open_stream(child.stdout) as reader:
        train = reader.read_all()
    return _split_holdout(train) if config.holdout else (train.drop_columns(["split"]), None)


def _split_holdout(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    import pyarrow.compute as pc

    is_held = pc.equal(table["split"], "heldout")
    return (table.filter(pc.invert(is_held)).drop_columns(["split"]),
            table.filter(is_held).drop_columns(["split"]))


def compute_rows(config: MathematicsConfig) -> pa.Table:
    """Every row of `config` with a `split` column ("train" / "heldout"); in this process."""
    import warnings

    from paced.store.problems import PROBLEM_SCHEMA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package's numpy/sympy deprecation warnings
        return _compute_rows(config, PROBLEM_SCHEMA)


def _compute_rows(config: MathematicsConfig, schema: pa.Schema) -> pa.Table:
    generators = load_modules()
    rows: dict[str, list] = {name: [] for name in (*schema.names, "split")}
    seen: set[str] = set()
    for module in config.modules:
        for level in config.levels:
            pairs = draw_problems(generators[level][module], config.per_level + config.holdout,
                                  _seed_for(config.seed, module, level), f"{module} level {level}", seen)
            meta = json.dumps({"module": module, "level": level}, sort_keys=True)
            for i, (question, answer) in enumerate(pairs):
                split = "train" if i < config.per_level else "heldout"
                for key, value in (("id", problem_id(question, answer)), ("prompt", question),
                                   ("answer", answer),
                                   ("difficulty", level), ("metadata", meta), ("split", split)):
                    rows[key].append(value)
    return pa.table(rows, schema=schema.append(pa.field("split", pa.string())))


def main() -> int:
    """The child of `generate_mathematics`: a config as JSON on stdin, an Arrow stream on stdout."""
    try:
        table = compute_rows(MathematicsConfig(**json.loads(sys.stdin.read())))
    except InputError as err:
        print(err.message, file=sys.stderr)
        return 1
    with pa.ipc.new_stream(sys.stdout.buffer, table.schema) as writer:
        writer.write_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
