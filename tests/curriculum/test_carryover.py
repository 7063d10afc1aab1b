"""Carry-over: discounted Beta counts, age-growing re-probes of settled problems, carried share."""

from __future__ import annotations

import numpy as np
import pytest

from paced.curriculum.carryover import (
    CarryOver,
    Evidence,
    combine_counts,
    reprobe_probability,
    select_fresh,
    step_evidence,
    uniform_draws,
)
from paced.errors import InputError


def test_old_counts_are_discounted_by_lambda_and_fresh_samples_added():
    c, n, carried = combine_counts([6, 0, 3], [8, 0, 4], [1, 2, 0], [2, 4, 0], 0.5)
    assert c.tolist() == [4.0, 2.0, 1.5] and n.tolist() == [6.0, 4.0, 2.0]
    assert carried.tolist() == pytest.approx([4 / 6, 0.0, 1.0])
    c0, n0, carried0 = combine_counts([6], [8], [1], [2], 0.0)  # λ = 0: today's refresh, nothing kept
    assert (c0[0], n0[0], carried0[0]) == (1.0, 2.0, 0.0)
    with pytest.raises(InputError, match="decay"):
        combine_counts([1], [2], [0], [1], 1.5)
    with pytest.raises(InputError, match="correct <= n"):
        combine_counts([3], [2], [0], [1], 0.5)
    for bad in ({"decay": -0.1}, {"fresh": 0}, {"reprobe_rate": 2.0}):
        with pytest.raises(InputError):
            CarryOver(**bad)


def test_settled_problems_are_reprobed_with_a_probability_growing_with_age():
    p = reprobe_probability([0, 1, 4, 30], 0.2)
    assert (p[0] == pytest.approx(0.2) and p[1] == pytest.approx(0.36) and np.all(np.diff(p) > 0)
            and p[-1] > 0.99)
    ids = [f"p{i}" for i in range(4000)]
    settled_young = select_fresh(ids, np.zeros(4000), np.full(4000, 8), np.zeros(4000), 0.2, seed=0,
                                 round_index=1)
    settled_old = select_fresh(ids, np.full(4000, 8), np.full(4000, 8), np.full(4000, 5), 0.2, seed=0,
                               round_index=1)
    # 0.2 and 1 - 0.8^6 = 0.738
    assert 0.17 < settled_young.mean() < 0.23 and 0.71 < settled_old.mean() < 0.77
    frontier = select_fresh(ids[:3], [1, 0, 2], [4, 0, 2], [9, 9, 0], 0.0, seed=0, round_index=1)
    assert frontier.tolist() == [True, True, False]  # frontier and unmeasured always; settled at rate 0 never
    assert np.array_equal(uniform_draws(ids[:5], 0, 1), uniform_draws(ids[:5], 0, 1))
    assert not np.array_equal(uniform_draws(ids[:5], 0, 1), uniform_draws(ids[:5], 0, 2))


def test_step_evidence_ages_what_it_does_not_refresh_and_records_the_carried_share():
    start = step_evidence(Evidence.empty(3), np.ones(3, bool), [8, 0, 4], [8, 8, 8], 0.0)
    assert start.pass_rate.tolist() == [1.0, 0.0, 0.5] and start.carried.tolist() == [0, 0, 0]
    nxt = step_evidence(start, np.array([False, True, True]), [0, 1, 2], [4, 4, 4], 0.5)
    assert nxt.n.tolist() == [8.0, 8.0, 8.0] and nxt.correct.tolist() == [8.0, 1.0, 4.0]
    assert nxt.age.tolist() == [1, 0, 0] and nxt.carried.tolist() == [1.0, 0.5, 0.5]


def test_carry_evidence_discounts_the_previous_row_and_a_new_problem_keeps_its_fresh_counts():
    import pyarrow as pa

    from paced.curriculum.carryover import carry_evidence
    from paced.store.snapshots import fill_evidence

    def table(ids, correct, n, stale):
        return fill_evidence(pa.table({"problem_id": ids, "correct": correct, "n": n, "stale_age": stale,
                                       "pass_rate": [c / k for c, k in zip(correct, n, strict=True)]}))

    previous = table(["a", "b", "c"], [8, 3, 0], [8, 8, 8], [0, 2, 1])
    assert previous["carried_share"].to_pylist() == [0.0, 1.0, 1.0]
    fresh = carry_evidence(previous, table(["b", "z"], [1, 2], [4, 4], [0, 0]), 0.5)
    assert fresh["evidence_n"].to_pylist() == [8.0, 4.0] and fresh["evidence_correct"].to_pylist() == [2.5,
                                                                                                       2.0]
    assert fresh["carried_share"].to_pylist() == [0.5, 0.0] and fresh["pass_rate"].to_pylist() == [2.5 / 8,
                                                                                                   0.5]
    assert fresh["n"].to_pylist() == [4, 4]  # the integer counts stay the fresh samples'
    untouched = table(["b"], [1], [4], [0])
    assert carry_evidence(previous, untouched, None).equals(untouched)
