"""builtin:mathematics: DeepMind's generators, graded by the real `math` grader, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paced.cli import main
from paced.errors import InputError
from paced.grading import verify
from paced.store.home import open_home
from paced.store.problems import read_problems
from paced.tasks.mathematics import (
    SUPPORTED_MODULES,
    MathematicsConfig,
    compute_rows,
    generate_mathematics,
    parse_levels,
    parse_modules,
)


def model_forms(answer: str) -> list[str]:
    """The answer as a model writes it: boxed, in a sentence, in math mode, in LaTeX."""
    import sympy

    latex = sympy.latex(sympy.sympify(answer))
    return [f"\\boxed{{{answer}}}", f"The answer is {answer}.", f"So it is ${answer}$.",
            f"The final answer is $\\boxed{{{latex}}}$"]


@pytest.mark.parametrize("module", SUPPORTED_MODULES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31))
def test_every_row_grades_correct_against_its_own_answer(module, level, seed):
    rows = compute_rows(MathematicsConfig(modules=(module,), levels=(level,), per_level=2, seed=seed))
    for answer in rows["answer"].to_pylist():
        for completion in model_forms(answer):
            assert verify("math", completion, answer) == "correct", (module, completion, answer)


@pytest.mark.parametrize(
    ("completion", "answer", "outcome"),
    [  # answers of the generators' kinds, against wrong ones a model might give
        ("\\boxed{-\\frac{11}{18}}", "-11/18", "correct"),
        ("\\boxed{\\frac{11}{18}}", "-11/18", "wrong"),
        ("The answer is -725.", "-725", "correct"),
        ("The answer is 725.", "-725", "wrong"),
        ("\\boxed{0.241191}", "0.241191", "correct"),
        ("\\boxed{0.24119}", "0.241191", "wrong"),
        ("\\boxed{-7.5}", "-7.5", "correct"),
        ("\\boxed{-\\frac{15}{2}}", "-7.5", "correct"),
        ("The probability is 3/170.", "3/170", "correct"),
        ("The probability is 3/17.", "3/170", "wrong"),
    ],
)
def test_generator_answers_grade_right_and_wrong(completion, answer, outcome):
    assert verify("math", completion, answer) == outcome


def test_same_seed_same_rows_in_any_process_and_other_seed_other_rows():
    """Generated in a child with a fixed hash seed, so parents with different hash seeds agree."""
    code = ("import hashlib, sys; from paced.tasks.mathematics import *; "
            "t, h = generate_mathematics(MathematicsConfig(modules=('numbers__gcd_composed', "
            "'algebra__linear_1d_composed'), levels=(1, 2), per_level=3, holdout=1, seed=int(sys.argv[1]))); "
            "print(hashlib.sha256(str((t.to_pylist(), h.to_pylist())).encode()).hexdigest())")
    digests = {}
    for hash_seed, seed in (("1", 7), ("2", 7), ("3", 8)):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, str(seed)], env=env, capture_output=True, text=True,
                             check=True)
        digests[(hash_seed, seed)] = out.stdout.strip()
    assert digests[("1", 7)] == digests[("2", 7)]
    assert digests[("1", 7)] != digests[("3", 8)]


def test_rows_cover_every_module_and_level_without_repeats():
    config = MathematicsConfig(modules=("arithmetic__add_or_sub", "numbers__gcd"), levels=(1, 3), per_level=4,
                               holdout=2, seed=3)
    train, held = generate_mathematics(config)
    assert train.num_rows == 2 * 2 * 4 and held.num_rows == 2 * 2 * 2
    ids = train["id"].to_pylist() + held["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    groups = {(json.loads(m)["module"], d) for m, d in zip(train["metadata"].to_pylist(),
                                                           train["difficulty"].to_pylist())}
    assert groups == {(m, lv) for m in config.modules for lv in config.levels}


def test_flags_parse_areas_and_level_names():
    assert parse_modules("arithmetic__mul, numbers__gcd") == ("arithmetic__mul", "numbers__gcd")
    assert set(parse_modules("probability")) == {"probability__swr_p_level_set",
                                                 "probability__swr_p_sequence"}
    assert parse_levels("easy,3,medium") == (1, 3, 2)
    with pytest.raises(InputError, match="unsupported module 'numbers__is_prime'"):
        parse_modules("numbers__is_prime")
    with pytest.raises(InputError, match="unknown level 'extreme'"):
        parse_levels("extreme")
    with pytest.raises(InputError, match="per_level must be >= 1"):
        MathematicsConfig(per_level=0)


def test_import_cli_writes_rows_once_and_reports_bad_flags(tmp_path, capsys):
    argv = ["import", "builtin:mathematics", "--modules", "arithmetic__add_or_sub", "--levels", "easy,medium",
            "--per-level", "3", "--holdout", "2", "--seed", "1", "--dataset", "school", "--home",
            str(tmp_path)]
    assert main(argv) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(s["dataset"], s["added"], s["grader"]) for s in first] == [("school", 6, "math"),
                                                                        ("school-heldout", 4, "math")]
    assert main(argv) == 0
    assert [json.loads(line)["added"] for line in capsys.readouterr().out.splitlines()] == [0, 0]
    table = read_problems(open_home(tmp_path), "school")
    assert sorted(set(table["difficulty"].to_pylist())) == [1, 2]
    assert pc.all(pc.match_substring(table["metadata"], '"module": "arithmetic__add_or_sub"')).as_py()
    assert main(["import", "builtin:mathematics", "--modules", "calculus", "--dataset", "x",
                 "--home", str(tmp_path)]) == 1
    assert "unknown or unsupported module 'calculus'" in capsys.readouterr().err
