"""Accuracy gates: what a build of a built-in model must reach to be kept.

The recipes sit near an edge where tiny numeric differences between CPUs decide whether the
teacher learns to carry (one machine: 100 / 91 / 88 / 74 % greedy on 1-4-digit addition, another:
100 / 15 / 11 / 12 % for the same recipe and seed). A gate states what each role needs; a build
that misses it is retried with the next seed and refused after the last one, so no silently
weaker model ends up in a data home.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paced.errors import InputError

OPERATION_NAMES = {"+": "addition", "-": "subtraction"}


@dataclass(frozen=True)
class AccuracyGate:
    """Bounds on held-out greedy accuracy by digit count ("1".."4", or "all"), as fractions.

    `minimum`: the build must reach at least this; `maximum`: at most this (a student has to
    leave a frontier above it). A level left out has no bound.
    """

    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    operation: str = "+"

    def __post_init__(self):
        if self.operation not in OPERATION_NAMES:
            raise InputError(f"gate `operation` must be one of {sorted(OPERATION_NAMES)}, got "
                             f"{self.operation!r}")
        for bound in (self.minimum, self.maximum):
            for level, value in bound.items():
                if not 0.0 <= value <= 1.0:
                    raise InputError(f"gate bound for level {level!r} must be in [0, 1], got {value}")

    def to_json(self) -> dict:
        return {"operation": self.operation, "minimum": dict(self.minimum), "maximum": dict(self.maximum)}


def _level_name(level: str, operation: str) -> str:
    what = OPERATION_NAMES[operation]
    return f"{what} overall" if level == "all" else f"{level}-digit {what}"


def compute_gate_failures(gate: AccuracyGate, accuracy: dict[str, dict[str, float]]) -> list[str]:
    """Every bound `accuracy` (build.json's `{operation: {level: fraction}}`) misses, as text.

    An empty list means the build passed. A level the evaluation lacks counts as a miss.
    """
    measured = accuracy.get(gate.operation, {})
    failures = []
    for level, bound in sorted(gate.minimum.items()):
        got = measured.get(level)
        if got is None or not got >= bound:
            failures.append(f"{_level_name(level, gate.operation)} {_percent(got)} < {_percent(bound)}")
    for level, bound in sorted(gate.maximum.items()):
        got = measured.get(level)
        if got is None or not got <= bound:
            failures.append(f"{_level_name(level, gate.operation)} {_percent(got)} > {_percent(bound)}")
    return failures


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.0f} %"


# What each built-in model's role needs. The teacher must carry (it verifies references on
# every level); the student must know one-digit sums yet leave most 3-4-digit ones unsolved,
# so its pass rates spread across 0..1. The quick models only exercise the loop: the quick
# teacher must verify most one-digit sums, the quick student must have learned something
# (one layer, 150 steps: 17-24 % of one-digit sums with seeds 1-3 on a Xeon).
GATES: dict[str, AccuracyGate] = {
    "teacher": AccuracyGate(minimum={"1": 0.95, "2": 0.80, "3": 0.70, "4": 0.60}),
    "student": AccuracyGate(minimum={"1": 0.90}, maximum={"3": 0.50, "4": 0.50}),
    "quick-teacher": AccuracyGate(minimum={"1": 0.80}),
    "quick-student": AccuracyGate(minimum={"1": 0.10}),
}
