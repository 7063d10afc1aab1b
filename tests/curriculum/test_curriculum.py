"""Properties of the pure core: weights, posterior weights, guards, manifests."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paced.curriculum import (
    WeightScheme,
    apply_guards,
    beta_weight,
    build_manifest,
    compute_weights,
    effective_sample_size,
    posterior_weight,
    shard_bounds,
)
from paced.errors import InputError, PacedError

settings.register_profile("paced-core", deadline=None, max_examples=60)
settings.load_profile("paced-core")

exponents = st.floats(min_value=0.0, max_value=8.0, allow_nan=False)
probs = st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1, max_size=50)


@given(probs, exponents, exponents)
def test_beta_weight_lies_between_zero_and_its_maximum(p, a, b):
    from scipy.special import xlogy

    w = beta_weight(p, a, b)
    # the maximum, at the mode a/(a+b), in closed form: a^a b^b / (a+b)^(a+b) (0^0 = 1). Evaluating
    # the weight at a float mode is not enough: with b = 1e-300 the mode rounds to 1.0, where w = 0.
    peak = float(np.exp(xlogy(a, a)
                        + xlogy(b, b) - xlogy(a + b, a + b)))  # in logs: no 0 from a/(a+b) underflowing
    assert np.all(w >= 0) and np.all(w <= peak + 1e-12)


@given(st.floats(min_value=1e-6, max_value=8.0), st.floats(min_value=1e-6, max_value=8.0))
def test_beta_weight_is_exactly_zero_at_the_ends(a, b):
    assert beta_weight([0.0, 1.0], a, b).tolist() == [0.0, 0.0]
    assert np.all(beta_weight([1e-9, 0.5, 1 - 1e-9], a, b) > 0)


def test_zero_exponents_give_one_everywhere_including_the_ends():
    assert beta_weight([0.0, 0.3, 1.0], 0.0, 0.0).tolist() == [1.0, 1.0, 1.0]
    assert beta_weight([0.0, 1.0], 0.0, 1.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad", [[-0.1], [1.1], [float("nan")]])
def test_beta_weight_rejects_bad_pass_rates(bad):
    with pytest.raises(PacedError):
        beta_weight(bad)


def test_negative_exponent_is_an_input_error():
    with pytest.raises(InputError, match="alpha"):
        beta_weight([0.5], alpha=-1)


@given(st.floats(min_value=0.01, max_value=0.99), exponents, exponents)
@settings(max_examples=50)
def test_posterior_weight_tends_to_the_kernel_as_n_grows(p, a, b):
    n = 10**6
    c = round(p * n)
    got = posterior_weight([c], [n], a, b)[0]
    assert got == pytest.approx(beta_weight([c / n], a, b)[0], rel=1e-3, abs=1e-9)


@given(st.integers(min_value=0, max_value=64).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_posterior_weight_is_positive_everywhere(cn):
    c, n = cn
    w = posterior_weight([c], [n])[0]
    assert 0 < w <= 0.25 + 1e-12


def test_posterior_weight_closed_form_small_case():
    # Beta(1,1) prior, 0 of 4 correct: posterior Beta(1,5); E[p(1-p)] = (1*5)/(6*7)
    assert posterior_weight([0], [4])[0] == pytest.approx(5 / 42)
    assert np.isfinite(posterior_weight([500_000], [1_000_000])).all()


def test_schemes_give_the_expected_weights():
    c, n = np.array([0, 2, 4, 8]), np.array([8, 8, 8, 8])
    assert compute_weights(c, n, WeightScheme(name="paced")).tolist() == pytest.approx([0, 0.1875, 0.25, 0])
    assert compute_weights(c, n, WeightScheme(name="uniform")).tolist() == [1, 1, 1, 1]
    assert compute_weights(c, n, WeightScheme(name="hard-filter")).tolist() == [0, 1, 1, 0]
    assert (compute_weights(c, n, WeightScheme(name="paced-posterior")) > 0).all()


def test_unmeasured_problems_are_never_silently_weighted():
    with pytest.raises(InputError, match="no rollouts"):
        compute_weights([0, 1], [0, 2], WeightScheme())


@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=40),
       st.floats(min_value=0.01, max_value=1.0))
def test_floor_is_respected(w, eps):
    out = apply_guards(np.array(w), weight_floor=eps)
    assert (out >= eps - 1e-12).all()


@given(st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=40),
       st.floats(min_value=0.01, max_value=1.0))
def test_uniform_mix_keeps_the_mean_at_one(w, lam):
    w = np.array(w)
    out = apply_guards(w, uniform_mix=lam)
    if w.mean() > 1e-300:  # all-zero weights have no mean-1 normalisation
        assert out.mean() == pytest.approx(1.0)
        assert (out >= lam - 1e-12).all()


def test_scheme_validation_names_the_field():
    with pytest.raises(InputError, match="scheme"):
        WeightScheme(name="nope")
    with pytest.raises(InputError, match=r"`weight_floor` must be in \[0, 1\], got -1"):
        WeightScheme(weight_floor=-1)
    with pytest.raises(InputError, match=r"`uniform_mix` must be in \[0, 1\], got 'x'"):
        WeightScheme(uniform_mix="x")
    with pytest.raises(InputError, match="`prior` must be two numbers > 0"):
        WeightScheme(prior=(0, 1))
    with pytest.raises(InputError, match="`prior` must be two numbers > 0"):
        WeightScheme(prior=(1.0,))
    with pytest.raises(TypeError):
        WeightScheme("paced")  # keyword-only: no positional six-argument calls


def test_a_scheme_reads_back_its_json_and_the_json_of_older_manifests():
    scheme = WeightScheme(name="paced-posterior", alpha=2.0, prior=(2.0, 3.0), uniform_mix=0.1)
    assert WeightScheme.from_json(scheme.to_json()) == scheme
    assert scheme.to_json()["scheme"] == "paced-posterior" and scheme.to_json()["prior"] == [2.0, 3.0]
    # manifest.json inputs written before the guards existed: no weight_floor / uniform_mix keys
    old = {"student_id": "s", "scheme": "paced", "alpha": 1.0, "beta": 1.0, "prior": [1.0, 1.0], "seed": 0}
    assert WeightScheme.from_json(old) == WeightScheme()
    assert WeightScheme(name="paced-posterior", uniform_mix=0.1).guard == "posterior+mix"


def _pass_table(counts, k=8):
    return pa.table({"problem_id": [f"p{i:04d}" for i in range(len(counts))],
                     "correct": counts, "n": [k if c >= 0 else 0 for c in counts]})


count_lists = st.lists(st.integers(min_value=0, max_value=8), min_size=1, max_size=80)


@given(count_lists, st.integers(0, 2**31), st.integers(0, 5))
def test_weighted_loss_manifest_is_a_permutation_of_eligible_ids(counts, seed, epoch):
    table = _pass_table(counts)
    m = build_manifest(table, WeightScheme(name="paced"), seed, epoch)
    eligible = {f"p{i:04d}" for i, c in enumerate(counts) if 0 < c < 8}
    ids = m.items["problem_id"].to_pylist()
    assert sorted(ids) == sorted(eligible) and len(ids) == len(set(ids))
    if ids:
        assert np.mean(m.items["weight"].to_numpy()) == pytest.approx(1.0)
    assert m.items["position"].to_pylist() == list(range(len(ids)))


@given(count_lists, st.integers(0, 1000))
def test_same_seed_same_manifest_whatever_the_input_order(counts, seed):
    table = _pass_table(counts)
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    a = build_manifest(table, WeightScheme(name="uniform"), seed, 0)
    b = build_manifest(shuffled, WeightScheme(name="uniform"), seed, 0)
    assert a.items.equals(b.items)


def test_a_different_epoch_gives_a_different_order():
    table = _pass_table([4] * 200)
    a = build_manifest(table, WeightScheme(), 0, 0).items["problem_id"].to_pylist()
    b = build_manifest(table, WeightScheme(), 0, 1).items["problem_id"].to_pylist()
    assert a != b and sorted(a) == sorted(b)


@given(count_lists, st.integers(0, 300))
def test_weighted_sample_manifest_is_a_multiset_of_positive_weight_ids(counts, draws):
    table = _pass_table(counts)
    positive = {f"p{i:04d}" for i, c in enumerate(counts) if 0 < c < 8}
    if not positive:
        with pytest.raises(InputError):
            build_manifest(table, WeightScheme(), 0, 0, "weighted-sample", num_samples=max(draws, 1))
        return
    m = build_manifest(table, WeightScheme(), 0, 0, "weighted-sample", num_samples=draws)
    assert m.num_items == draws and set(m.items["problem_id"].to_pylist()) <= positive
    assert set(m.items["weight"].to_pylist()) <= {1.0}


def test_weighted_sample_frequencies_follow_the_weights():
    table = _pass_table([4, 1])  # weights 0.25 and 0.109375
    m = build_manifest(table, WeightScheme(), 3, 0, "weighted-sample", num_samples=20000)
    share = m.items["problem_id"].to_pylist().count("p0000") / 20000
    assert share == pytest.approx(0.25 / (0.25 + 0.109375), abs=0.015)


def test_unmeasured_problems_are_counted_not_served():
    table = pa.table({"problem_id": ["a", "b", "c"], "correct": [0, 4, 0], "n": [0, 8, 8]})
    m = build_manifest(table, WeightScheme(), 0)
    assert (m.unmeasured, m.zero_weight, m.num_items) == (1, 1, 1)


def test_duplicate_ids_are_rejected():
    with pytest.raises(InputError, match="duplicate"):
        build_manifest(pa.table({"problem_id": ["a", "a"], "correct": [1, 1], "n": [2, 2]}), WeightScheme(),
                       0)


@given(st.integers(0, 5000), st.integers(1, 700))
def test_shards_cover_every_item_once(n, size):
    bounds = shard_bounds(n, size)
    covered = [i for a, b in bounds for i in range(a, b)]
    assert covered == list(range(n)) and all(0 < b - a <= size for a, b in bounds)


def test_effective_sample_size():
    assert effective_sample_size([1, 1, 1, 1]) == pytest.approx(4)
    assert effective_sample_size([1, 0, 0, 0]) == pytest.approx(1)
    assert effective_sample_size([]) == 0
