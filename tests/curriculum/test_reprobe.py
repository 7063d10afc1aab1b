"""Cheap refresh selection and stale carry-forward."""

import math

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paced.curriculum.reprobe import carry_forward, select_reprobe
from paced.errors import InputError


def table(rates, age=0, student="s0"):
    n = len(rates)
    return pa.table({"problem_id": [f"p{i:03d}" for i in range(n)], "dataset": ["d"] * n,
                     "student_id": [student] * n, "pass_rate": rates,
                     "stale_age": pa.array([age] * n, pa.int32())})


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=60),
       st.floats(0.05, 1.0), st.integers(0, 1000))
@settings(deadline=None, max_examples=60)
def test_frontier_always_and_every_end_within_a_period(rates, fraction, seed):
    t = table(rates)
    frontier = {f"p{i:03d}" for i, r in enumerate(rates) if 0 < r < 1}
    ends = {f"p{i:03d}" for i, r in enumerate(rates) if r in (0.0, 1.0)}
    period = math.ceil(1 / fraction)
    seen = set()
    for r in range(period):
        chosen = set(select_reprobe(t, fraction, seed, r).to_pylist())
        assert frontier <= chosen
        seen |= chosen - frontier
    assert seen == ends


def test_zero_fraction_rerolls_only_the_frontier_and_is_deterministic():
    t = table([0.0, 0.5, 1.0, 0.25])
    assert select_reprobe(t, 0.0, 1, 0).to_pylist() == ["p001", "p003"]
    assert select_reprobe(t, 0.5, 3, 2).equals(select_reprobe(t, 0.5, 3, 2))
    with pytest.raises(InputError, match="reprobe_fraction"):
        select_reprobe(t, 1.5, 0, 0)


def test_carry_forward_ages_unprobed_rows_and_replaces_fresh_ones():
    prev = table([0.0, 0.5, 1.0], age=2)
    fresh = table([0.75], student="s1").set_column(0, "problem_id", pa.array(["p001"]))
    merged = carry_forward(prev, fresh).to_pylist()
    by_id = {r["problem_id"]: r for r in merged}
    assert by_id["p001"]["pass_rate"] == 0.75 and by_id["p001"]["stale_age"] == 0
    assert by_id["p001"]["student_id"] == "s1"
    assert by_id["p000"]["stale_age"] == 3 and by_id["p002"]["student_id"] == "s0"
    assert len(merged) == 3
