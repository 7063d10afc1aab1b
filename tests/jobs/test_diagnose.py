"""`paced diagnose`: gradient SNR and held-out alignment by pass-rate bin, on tiny real models and a
real data home; the pure signal measures on gradients whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from api_fixtures import make_service_home
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_helpers import build_models

from paced.cli import main
from paced.curriculum.signal import compute_bin_signal, pass_rate_bin, verdict
from paced.store.problems import write_problem_part


def test_bins_split_the_pass_rate_range():
    assert list(pass_rate_bin([0, 0.125, 1 / 3, 0.5, 2 / 3, 0.875, 1])) == \
        ["zero", "low", "low", "mid", "high", "high", "one"]


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10), st.integers(50, 400), st.integers(0, 2**31 - 1))
def test_snr_recovers_a_known_signal_to_noise_ratio(scale, n, seed):
    rng = np.random.default_rng(seed)
    dim = 64
    mean = np.zeros(dim)
    mean[0] = scale  # ‖μ‖² = scale², noise: unit variance per coordinate -> E‖g−ḡ‖² ≈ dim
    grads = mean + rng.standard_normal((n, dim))
    s = compute_bin_signal("mid", grads, heldout=np.eye(dim)[0])
    assert s.snr == pytest.approx(scale**2 / dim, abs=0.5 * scale**2 / dim + 4 / n)  # ‖μ‖² / tr Σ
    assert s.problems == n
    if scale >= 1:  # the mean stands well clear of its own noise (sd 1/√n per coordinate)
        assert s.alignment > 0.3


def test_pure_noise_is_weak_and_unaligned_and_the_verdict_says_so():
    rng = np.random.default_rng(0)
    direction = np.eye(32)[0]
    coherent = [compute_bin_signal(b, 3 * direction + rng.standard_normal((40, 32)), direction)
                for b in ("low", "mid", "high")]
    noise = [compute_bin_signal(b, rng.standard_normal((40, 32)), direction) for b in ("zero", "one")]
    assert all(n.snr < 0.2 * c.snr for n in noise for c in coherent)
    assert "frontier weighting (paced, hard-filter)" in verdict(coherent + noise)
    assert all(c.alignment_sd is not None and 0 < c.alignment_sd < 0.2 for c in coherent)
    ends_like_middle = [compute_bin_signal(b, 3 * direction + rng.standard_normal((40, 32)), direction)
                        for b in ("zero", "one")]
    assert "equal within noise" in verdict(coherent + ends_like_middle)  # the same kind of bin: no difference
    assert "prefer paced-posterior or uniform" in verdict(coherent + ends_like_middle)
    # a frontier whose mean points away from the held-out set, a p̂ = 0 bin noisy but pointing at it
    frontier = [compute_bin_signal(b, m * direction + rng.standard_normal((200, 32)), direction)
                for b, m in (("low", -1.0), ("mid", 0.2), ("high", 0.2))]
    zero = compute_bin_signal("zero", 0.5 * direction + rng.standard_normal((200, 32)), direction)
    assert zero.snr < np.mean([f.snr for f in frontier])
    assert "point toward the held-out set" in verdict([*frontier, zero])  # alignment decides before the SNR
    assert compute_bin_signal("zero", np.zeros((3, 4)), None).snr is None  # too few problems: no SNR
    pure = [compute_bin_signal("zero", np.random.default_rng(s).standard_normal((n, 16)), None).snr
            for s in range(200) for n in (4, 40)]
    assert abs(np.mean(pure)) < 0.02  # unbiased: pure noise reads ≈ 0 at any bin size


def test_diagnose_runs_on_tiny_models_in_both_regimes(tmp_path, capsys):
    home, _ = make_service_home(tmp_path, n=90)  # p̂ = (i mod 9)/8: every bin has 10 problems; refs for even i
    held = pa.table({"id": [f"h{i}" for i in range(6)], "prompt": [f"{i}+{i}=" for i in range(6)],
                     "answer": [str(2 * i) for i in range(6)], "difficulty": pa.array([1] * 6, pa.int32()),
                     "metadata": ["{}"] * 6})
    write_problem_part(home, "arith-test", held, grader="exact", source="test")
    student, teacher = build_models(tmp_path / "models")
    out = tmp_path / "diag.png"
    code = main(["diagnose", "--home", str(home.root), "--student", str(student), "--teacher", str(teacher),
                 "--student-id", "s1", "--dataset", "arith", "--heldout", "arith-test", "--per-bin", "4",
                 "--dim", "256", "--max-new-tokens", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert set(result["regimes"]) == {"off-policy", "on-policy"}
    for regime in result["regimes"].values():
        bins = regime["bins"]
        assert [b["bin"] for b in bins] == ["zero", "low", "mid", "high", "one"]
        assert {b["problems"] for b in bins} == {4}
        assert all(np.isfinite(b["snr"]) and -1 <= b["alignment"] <= 1 for b in bins)
        assert regime["verdict"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out cos" in captured.err


def test_diagnose_shows_na_for_a_bin_without_enough_references(tmp_path, capsys):
    home, _ = make_service_home(tmp_path, n=27)  # 3 problems per p̂ value; references for even i only
    student, teacher = build_models(tmp_path / "models")
    code = main(["diagnose", "--home", str(home.root), "--student", str(student), "--teacher", str(teacher),
                 "--student-id", "s1", "--dataset", "arith", "--heldout", "arith", "--per-bin", "8",
                 "--dim", "64", "--regime", "off-policy"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    bins = json.loads(captured.out.strip().splitlines()[-1])["regimes"]["off-policy"]["bins"]
    zero, one = bins[0], bins[-1]  # p̂ = 0 and p̂ = 1: 3 problems each, 1–2 with a reference
    assert zero["snr"] is None and one["snr"] is None and zero["problems"] < 4
    assert bins[2]["snr"] is not None  # ⅓ < p̂ < ⅔ holds 9 problems, about half with a reference


def test_diagnose_bad_input_is_one_clear_line(tmp_path, capsys):
    home, _ = make_service_home(tmp_path, n=18)
    code = main(["diagnose", "--home", str(home.root), "--student", str(tmp_path / "nope"), "--teacher",
                 str(tmp_path / "nope"), "--student-id", "s1", "--dataset", "arith", "--heldout", "arith",
                 "--per-bin", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "per_bin" in err and "Traceback" not in err
