"""Grading: the real verifiers, and the real worker pool killing real hung and crashing graders."""

from __future__ import annotations

import multiprocessing
import os
import time

import psutil
import pytest

from paced.errors import InputError, PacedError
from paced.grading import GradingPool, Outcome, Verifier, grader_version, verify
from paced.grading.verifiers import verify_exact, verify_math

# math-verify tries to evaluate this power tower and never finishes.
HANGS_MATH_VERIFY = ("\\boxed{9^{9^{9^{9}}}}", "1")


# ---- graders that misbehave on purpose; module-level so worker processes can import them ----


def crash_on_marker(completion: str, answer: str) -> Outcome:
    """Kill the worker process outright (as a segfault would) when asked to."""
    if completion == "CRASH":
        os._exit(3)
    return verify_exact(completion, answer)


def hang_on_marker(completion: str, answer: str) -> Outcome:
    if completion == "HANG":
        time.sleep(3600)
    return verify_exact(completion, answer)


def raise_on_marker(completion: str, answer: str) -> Outcome:
    if completion == "RAISE":
        raise RuntimeError("grader bug")
    return verify_exact(completion, answer)


def fail_setup() -> None:
    raise RuntimeError("cannot set up")


def _worker_pids() -> set[int]:
    """Spawned worker processes (not multiprocessing's long-lived resource tracker)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture
def no_leaked_workers():
    before = _worker_pids()
    yield
    leaked = _worker_pids() - before
    assert not leaked, f"worker processes still alive after the job: {leaked}"
    assert not multiprocessing.active_children()


# ---- verifiers --------------------------------------------------------------------------------


def test_exact_normalises_whitespace_and_case():
    assert verify("exact", "  Paris\n", "paris") == "correct"
    assert verify("exact", "New   York", "new york") == "correct"
    assert verify("exact", "London", "paris") == "wrong"
    assert verify("exact", " \n\t", "paris") == "unparseable"


@pytest.mark.parametrize(
    ("completion", "answer", "outcome"),
    [
        ("357", "357", "correct"),
        ("The answer is 357.", "357", "correct"),
        ("12+345=357", "357", "correct"),  # the last number counts
        ("-333", "-333", "correct"),
        ("12-345=-333", "-333", "correct"),
        ("1,234", "1234", "correct"),
        ("0.5000000001", "0.5", "correct"),  # within rel 1e-9 / abs 1e-6
        ("0.500001", "0.5", "wrong"),
        ("1000000001", "1000000000", "wrong"),  # integers compare exactly
        ("358", "357", "wrong"),
        ("35", "357", "wrong"),
        ("no digits at all", "357", "unparseable"),
        ("", "357", "unparseable"),
        ("1e400", "1", "unparseable"),  # overflows a float
        ("9" * 5000, "1", "unparseable"),
    ],
)
def test_numeric(completion, answer, outcome):
    assert verify("numeric", completion, answer) == outcome


def test_numeric_rejects_reference_answer_without_number():
    with pytest.raises(InputError, match="holds no number"):
        verify("numeric", "3", "three")


@pytest.mark.parametrize(
    ("completion", "answer", "outcome"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
        ("So the result is $\\frac{2}{4}$.", "\\frac{1}{2}", "correct"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", "correct"),
        ("\\boxed{3}", "4", "wrong"),
        ("I do not know.", "4", "unparseable"),
    ],
)
def test_math(completion, answer, outcome):
    assert verify("math", completion, answer) == outcome


# References written without LaTeX delimiters, against answers in the forms a model writes them.
# Version 1 of the grader read such a reference with plain extraction: `(1, 2)` became `2`.
@pytest.mark.parametrize(
    ("completion", "answer", "outcome"),
    [
        ("\\boxed{(1,2)}", "(1, 2)", "correct"),  # tuple / open interval
        ("The answer is $(1, 2)$.", "(1, 2)", "correct"),
        ("\\boxed{2}", "(1, 2)", "wrong"),
        ("\\boxed{(2, 1)}", "(1, 2)", "wrong"),
        ("\\boxed{[1, 3)}", "[1, 3)", "correct"),  # interval
        ("\\boxed{(1, 3)}", "[1, 3)", "wrong"),
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1, 2, 3\\}", "correct"),  # set, any order
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", "wrong"),
        ("\\boxed{7, 3, 2}", "2, 3, 7", "correct"),  # a list of values read as a set
        ("\\boxed{\\frac{3}{4}}", "3/4", "correct"),  # fractions
        ("The answer is 3/4.", "3/4", "correct"),  # the full stop is not a decimal point
        ("The answer is -5/53.", "-5/53", "correct"),
        ("The answer is 0.75", "3/4", "correct"),
        ("\\boxed{-\\frac{3}{4}}", "-3/4", "correct"),  # negatives
        ("\\boxed{\\frac{3}{4}}", "-3/4", "wrong"),
        ("The answer is -17.", "-17", "correct"),
        ("\\boxed{50\\%}", "50\\%", "correct"),  # percentages
        ("The answer is $50\\%$.", "0.5", "correct"),
        ("\\boxed{x = 3}", "x = 3", "correct"),  # equations
        ("\\boxed{3}", "x = 3", "correct"),
        ("\\boxed{x = 4}", "x = 3", "wrong"),
        ("\\boxed{y = 1 + 2x}", "y=2x+1", "correct"),
        ("\\boxed{y = 2x}", "y=2x+1", "wrong"),
        ("\\boxed{3 + 2\\sqrt{5}}", "3 + 2*sqrt(5)", "correct"),  # expressions
        ("The final answer is 12. It is right.", "12", "correct"),
        ("The final answer is 1.5.", "1.5", "correct"),  # a decimal point stays one
        ("The final answer is 15.", "1.5", "wrong"),
        # restating the question is not an answer, though math-verify would evaluate it (seen in
        # SmolLM2-135M's rollouts on builtin:mathematics)
        ("The wedding in question is 19886.723 + 2.0499 = abc", "19888.7729", "wrong"),
        ("To find 0.4*-12 you take a negative.", "-4.8", "wrong"),
        ("\\boxed{2 + 3}", "5", "wrong"),
        ("It is (1/4)/((-13)/(-8)).", "2/13", "wrong"),
        ("1.5759 - -19.1 is a new value", "20.6759", "wrong"),
        ("So 1.5759 - -19.1 = 20.6759.", "20.6759", "correct"),
        ("\\boxed{-\\frac{11}{18}}", "-11/18", "correct"),
        ("The answer is -11/18", "-11/18", "correct"),
    ],
)
def test_math_parses_references_as_latex_first(completion, answer, outcome):
    assert verify("math", completion, answer) == outcome


def test_grader_versions_name_the_library():
    import importlib.metadata

    assert grader_version("math") == f"math@2-math-verify-{importlib.metadata.version('math-verify')}"
    assert grader_version("numeric") == "numeric@1"
    with pytest.raises(InputError, match="unknown grader"):
        grader_version("nope")


# ---- the pool ---------------------------------------------------------------------------------


def test_numeric_grades_a_rollout_of_40000_answers_in_process_quickly():
    items = [(f"{i + 1}", f"{i}") if i % 3 == 0 else (f"{i}", f"{i}") for i in range(40_000)]
    start = time.perf_counter()
    with GradingPool("numeric") as pool:
        verdicts = pool.grade(items)
    elapsed = time.perf_counter() - start
    assert [v.outcome for v in verdicts[:4]] == ["wrong", "correct", "correct", "wrong"]
    assert all(v.grader == "numeric@1" for v in verdicts)
    assert elapsed < 5.0, f"{len(items) / elapsed:.0f} answers/s"


def test_math_pool_keeps_input_order_across_batches_and_workers(no_leaked_workers):
    items = [(f"\\boxed{{{i % 7}}}", str(i % 5)) for i in range(100)] + [("nothing here", "1")]
    with GradingPool("math", workers=2) as pool:
        verdicts = pool.grade(items)
    expected = ["correct" if i % 7 == i % 5 else "wrong" for i in range(100)] + ["unparseable"]
    assert [v.outcome for v in verdicts] == expected
    assert {v.grader for v in verdicts} == {grader_version("math")}


def test_pathological_math_answer_really_hangs_without_a_limit():
    ctx = multiprocessing.get_context("spawn")
    process = ctx.Process(target=verify_math, args=HANGS_MATH_VERIFY, daemon=True)
    process.start()
    process.join(timeout=8.0)  # imports take ~1-2 s; the grade itself would be instant
    still_running = process.is_alive()
    process.kill()
    process.join()
    assert still_running


def test_hung_math_grader_is_killed_at_the_limit_and_the_job_goes_on(no_leaked_workers):
    limit = 1.5
    with GradingPool("math", workers=1, timeout_seconds=limit) as pool:
        pool.grade([("\\boxed{1}", "1")])  # wait until the worker is ready
        start = time.monotonic()
        [verdict] = pool.grade([HANGS_MATH_VERIFY])
        elapsed = time.monotonic() - start
        assert verdict.outcome == "timeout"
        assert elapsed < limit + 1.0
        # The same batch: the items after the hung one are re-queued onto a fresh worker.
        verdicts = pool.grade(
            [("\\boxed{2}", "2"), HANGS_MATH_VERIFY, ("\\boxed{3}", "3"), ("\\boxed{4}", "5")]
        )
    assert [v.outcome for v in verdicts] == ["correct", "timeout", "correct", "wrong"]


def test_hanging_injected_grader_times_out_with_two_workers(no_leaked_workers):
    grader = Verifier("hang", "test", hang_on_marker)
    items = [("a", "a"), ("HANG", "a"), ("b", "a"), ("HANG", "b"), ("c", "c")]
    with GradingPool(grader, workers=2, timeout_seconds=1.0) as pool:
        verdicts = pool.grade(items)
    assert [v.outcome for v in verdicts] == ["correct", "timeout", "wrong", "timeout", "correct"]
    assert verdicts[0].grader == "hang@test"


def test_crashing_worker_gives_error_and_the_pool_goes_on(no_leaked_workers):
    grader = Verifier("crash", "test", crash_on_marker)
    items = [("a", "a"), ("CRASH", "a"), ("b", "a")] * 4
    with GradingPool(grader, workers=2, timeout_seconds=5.0) as pool:
        verdicts = pool.grade(items)
        assert len(pool._pool) == 2 and all(w.process.is_alive() for w in pool._pool)
    assert [v.outcome for v in verdicts] == ["correct", "error", "wrong"] * 4


def test_raising_grader_gives_error_without_losing_the_worker(no_leaked_workers):
    grader = Verifier("raise", "test", raise_on_marker)
    with GradingPool(grader, workers=1) as pool:
        pids = {w.process.pid for w in pool._pool}
        verdicts = pool.grade([("RAISE", "x"), ("x", "x"), ("RAISE", "x")])
        assert {w.process.pid for w in pool._pool} == pids
    assert [v.outcome for v in verdicts] == ["error", "correct", "error"]
    assert verify("exact", "x", "x") == "correct"


def test_worker_that_cannot_start_is_a_clear_error(no_leaked_workers):
    grader = Verifier("broken", "test", verify_exact, setup=fail_setup)
    with pytest.raises(PacedError, match="failed to start"), GradingPool(grader, workers=1) as pool:
        pool.grade([("a", "a")])


def test_pool_rejects_bad_settings():
    with pytest.raises(InputError, match="workers"):
        GradingPool("math", workers=0)
    with pytest.raises(InputError, match="timeout_seconds"):
        GradingPool("math", timeout_seconds=0)
    with pytest.raises(InputError, match="unknown grader"):
        GradingPool("sympy")
