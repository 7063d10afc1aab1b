"""Verifiers: does a completion give the reference answer?

A verifier is a plain function `(completion, answer) -> Outcome`, wrapped in a `Verifier` that
names and versions it; `VERIFIERS` maps a data set's grader name to it (no plugin system). Every
verdict records `name@version`, so a pass rate says which grader produced it.

- `exact`: normalised strings (strip, collapse whitespace, case-fold) are equal.
- `numeric`: the last number in the completion equals the answer's number. Integer literals
  compare exactly (a tolerance would accept off-by-one answers of 10+ digits); anything else
  compares as floats within `abs 1e-6` or `rel 1e-9`. The built-in arithmetic task uses it.
- `math`: math-verify (`\\boxed{}` / final-answer extraction, numeric and symbolic equivalence).
  A reference is parsed as LaTeX first (see `_parse_reference`); an answer that only restates
  arithmetic (`19886.723 + 2.0499 = …`) is wrong (`is_unevaluated`). Version 2: version 1 parsed
  bare references with plain extraction, which kept only their last number, and graded such
  restatements correct, since math-verify evaluates them.

`exact` and `numeric` run in-process (`in_process=True`): each is a few linear-time passes
over its strings (regexes without nested quantifiers, `str.split`, `float`, `int` capped at
`_MAX_INT_DIGITS` digits), so they cannot hang. `math` can (sympy will try to evaluate
`9^{9^{9^{9}}}`), so it only runs in `GradingPool`'s killable worker processes; its own
signal-based timeouts are switched off (they work only in a main thread).
"""

from __future__ import annotations

import enum
import functools
import importlib.metadata
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from paced.errors import InputError


class Outcome(enum.StrEnum):
    """What grading one answer found. Verifiers return the first three; the pool adds the rest."""

    CORRECT = "correct"
    WRONG = "wrong"
    UNPARSEABLE = "unparseable"  # no answer could be extracted from the completion
    TIMEOUT = "timeout"  # the grader ran past the pool's wall-clock limit and was killed
    ERROR = "error"  # the grader raised, or its worker process died


@dataclass(frozen=True)
class Verifier:
    """A named, versioned grading function.

    `function` must be a module-level function (it is pickled by reference into worker
    processes); `setup`, if given, runs once in each worker before it takes work.
    """

    name: str
    version: str
    function: Callable[[str, str], Outcome]
    in_process: bool = False
    setup: Callable[[], None] | None = None

    @property
    def label(self) -> str:
        """`name@version`, recorded with every verdict."""
        return f"{self.name}@{self.version}"


# ---- exact ------------------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, case-fold."""
    return " ".join(text.split()).casefold()


def verify_exact(completion: str, answer: str) -> Outcome:
    """Normalised string equality; an empty (or all-blank) completion is unparseable."""
    got = normalise_text(completion)
    if not got:
        return Outcome.UNPARSEABLE
    return Outcome.CORRECT if got == normalise_text(answer) else Outcome.WRONG


# ---- numeric ----------------------------------------------------------------------------------

ABS_TOLERANCE = 1e-6
REL_TOLERANCE = 1e-9
_MAX_INT_DIGITS = 4000  # below Python's int-from-str limit (4300); longer integers are unparseable
# A number: optional minus (not when it follows a digit, where it is an operator: "12-345"),
# then 1,234,567 or 1234.5 or .5, then an optional exponent.
_NUMBER = re.compile(
    r"(?:(?<![\d.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|(?:(?<![\d.])-)?\.\d+"
)


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators removed), or None."""
    found = None
    for found in _NUMBER.finditer(text):  # noqa: B007 - keep the last match
        pass
    # "357." ends a sentence: the dot is not part of the number.
    return None if found is None else found.group().replace(",", "").rstrip(".")


def _is_integer_literal(token: str) -> bool:
    return token.lstrip("-").isdigit()


def numbers_equal(got: str, want: str) -> bool | None:
    """Compare two number tokens; None when one cannot be read as a finite number."""
    if _is_integer_literal(got) and _is_integer_literal(want):
        if max(len(got), len(want)) > _MAX_INT_DIGITS:
            return None
        return int(got) == int(want)
    a, b = float(got), float(want)
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


def verify_numeric(completion: str, answer: str) -> Outcome:
    """The last number in the completion against the answer's number (see module doc)."""
    want = last_number(answer)
    if want is None:
        raise InputError(f"numeric grader: the reference answer {answer[:80]!r} holds no number")
    got = last_number(completion)
    if got is None:
        return Outcome.UNPARSEABLE
    equal = numbers_equal(got, want)
    if equal is None:
        return Outcome.UNPARSEABLE
    return Outcome.CORRECT if equal else Outcome.WRONG


# ---- math (math-verify) -----------------------------------------------------------------------


def setup_math() -> None:
    """Import math-verify and sympy and warm the parser, so the first answer is not slow.

    Also quiets math-verify's warning that its own timeout is off: the pool enforces one.
    """
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verify_math("\\boxed{\\frac{1}{2}}", "0.5")


# A reference already in LaTeX or math mode: `$…$`, `\\(…\\)`, `\\[…\\]`, `\\boxed{…}`.
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")
# A number ending a sentence: "The answer is 3/5." (the dot after the last digit, then space or end).
_SENTENCE_DOT = re.compile(r"(?<=\d)\.(?=\s*$|\s+[A-Z])")


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str) -> list:
    """Parse a reference answer as LaTeX first, then with plain extraction.

    A reference is the whole answer, not a text to extract an answer from: written without
    delimiters it is parsed inside `$…$`, so `(1, 2)` is a tuple or interval, `\\{1, 2\\}` a set,
    `50\\%` a percentage, `x = 3` an equation (plain extraction would take its last number).
    Only when that finds nothing is it parsed as plain text."""
    from math_verify import parse

    gold = [] if _DELIMITED.search(answer) else parse(f"${answer}$", parsing_timeout=None)
    if not gold:
        gold = parse(answer, parsing_timeout=None)
    if not gold:
        raise InputError(f"math grader: cannot parse the reference answer {answer[:80]!r}")
    return gold


def normalise_completion(completion: str) -> str:
    """A number that ends a sentence loses the full stop, which math-verify would read as a
    decimal point (`The answer is 3/5.` is 3/5, not 3/5.0)."""
    return _SENTENCE_DOT.sub("", completion)


# Plain numbers joined by operators: what is left of a question restated, not an answer.
_PLAIN_ARITHMETIC = re.compile(r"[\d\s.,()+\-*/^×·]+")
_BINARY_OPERATOR = re.compile(r"[+*^×·]|[\d)]\s*-")


def is_unevaluated(extracted: str) -> bool:
    """True for an arithmetic expression of plain numbers such as `19886.723 + 2.0499` or
    `(1/4)/(13/8)`: math-verify would evaluate it and grade a completion that merely restates
    the question as correct. One fraction (`-3/4`) is an answer, not an expression."""
    text = extracted.strip()
    if not _PLAIN_ARITHMETIC.fullmatch(text):
        return False
    return bool(_BINARY_OPERATOR.search(text)) or text.count("/") > 1


def verify_math(completion: str, answer: str) -> Outcome:
    """math-verify's extraction and equivalence, with its signal timeouts off (see module doc);
    an extracted answer that is an unevaluated sum, difference, product or power of plain
    numbers is wrong (`is_unevaluated`)."""
    from math_verify import parse, verify

    gold = _parse_reference(answer)
    got = parse(normalise_completion(completion), parsing_timeout=None)
    if not got:
        return Outcome.UNPARSEABLE
    if isinstance(got[-1], str) and is_unevaluated(got[-1]):
        return Outcome.WRONG
    return Outcome.CORRECT if verify(gold, got, timeout_seconds=None) else Outcome.WRONG


def _library_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


VERIFIERS: dict[str, Verifier] = {
    "exact": Verifier("exact", "1", verify_exact, in_process=True),
    "numeric": Verifier("numeric", "1", verify_numeric, in_process=True),
    "math": Verifier("math", f"2-math-verify-{_library_version('math-verify')}", verify_math,
                     setup=setup_math),
}


def get_verifier(grader: str | Verifier) -> Verifier:
    """The registered verifier of that name (a `Verifier` passes through unchanged)."""
    if isinstance(grader, Verifier):
        return grader
    try:
        return VERIFIERS[grader]
    except KeyError:
        raise InputError(f"unknown grader {grader!r}; choose one of {', '.join(sorted(VERIFIERS))}") from None


def grader_version(name: str) -> str:
    """`name@version` of a registered grader, e.g. `math@math-verify-0.9.0`."""
    return get_verifier(name).label


def verify(name: str, completion: str, answer: str) -> Outcome:
    """Grade one answer in this process, with no time limit (use `GradingPool` for `math`)."""
    return get_verifier(name).function(completion, answer)
