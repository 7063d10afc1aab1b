"""Grading: verifiers (`exact`, `numeric`, `math`) and a pool of killable worker processes."""

from paced.grading.pool import GradingPool, Verdict
from paced.grading.verifiers import VERIFIERS, Outcome, Verifier, get_verifier, grader_version, verify

__all__ = [
    "VERIFIERS",
    "GradingPool",
    "Outcome",
    "Verdict",
    "Verifier",
    "get_verifier",
    "grader_version",
    "verify",
]
