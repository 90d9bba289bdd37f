"""pass@k against brute force, maj@k, support metrics, entropies and the ScaleRL sigmoid fit."""

import itertools
import math

import numpy as np
import pytest

from stalwart.trainer.rl.analysis import (
    answer_entropy,
    empirical_support,
    fit_sigmoid,
    maj_at_k,
    mean_pass_at_k,
    pass_at_k,
    plot_sigmoid_fit,
    sigmoid_curve,
    token_entropy,
)


def test_pass_at_k_matches_brute_force_enumeration():
    for num_samples in range(1, 9):
        for num_correct in range(num_samples + 1):
            outcomes = [1] * num_correct + [0] * (num_samples - num_correct)
            for k in range(1, num_samples + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(num_samples, num_correct, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_validates():
    # 1 correct of 8192: pass@4096 = 4096/8192 exactly.
    assert pass_at_k(8192, 1, 4096) == pytest.approx(0.5, abs=1e-9)
    assert mean_pass_at_k([0, 4], 4, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)


def test_maj_at_k_exact_and_sampled():
    answers = ["7", "7", "3", None]
    assert maj_at_k(answers, "7", 1) == pytest.approx(0.5)
    # k=4: "7" wins outright.
    assert maj_at_k(answers, "7", 4) == 1.0
    # k=2: {7,7}: 1, {7,3} x2: tie -> 1/2 each, {7,None} x2: 1, {3,None}: 0 -> (1+1+2)/6.
    assert maj_at_k(answers, "7", 2) == pytest.approx(4 / 6)
    many = ["1"] * 30 + ["2"] * 20
    exact = maj_at_k(many, "1", 5, max_subsets=10**7)
    sampled = maj_at_k(many, "1", 5, max_subsets=4000, seed=1)
    assert abs(exact - sampled) < 0.03


def test_empirical_support_counts_and_rates():
    base = [3, 0, 1, 0, 2, 5]
    model = [4, 2, 0, 0, 1, 5]
    report = empirical_support(base, model, k=8192, zeta=0.05)
    assert (report.preserved, report.expanded, report.shrunk, report.out_of_support) == (3, 1, 1, 1)
    assert report.srr == pytest.approx(3 / 4)
    assert report.ndr == pytest.approx(1 / 4)
    assert report.sds == pytest.approx(2 * 0.75 * 0.25 / 1.0)
    assert report.nscr == pytest.approx(0.0)
    assert report.epsilon == pytest.approx(3.66e-4, rel=0.01)
    with pytest.raises(ValueError, match="same problems"):
        empirical_support([1], [1, 2], k=4)


def test_entropies():
    assert answer_entropy(["a", "b", "c", "d"]) == pytest.approx(math.log(4))
    assert answer_entropy(["a", "a"]) == 0.0
    assert answer_entropy(["a", None]) == pytest.approx(math.log(2))
    assert token_entropy([[1.0, 3.0], [0.5]]) == pytest.approx((2.0 + 0.5) / 2)


def test_sigmoid_fit_recovers_parameters_from_a_noisy_curve_and_extrapolates(tmp_path):
    rng = np.random.default_rng(0)
    truth = {"r0": 0.1, "a": 0.7, "b": 1.5, "c_mid": 500.0}
    compute = np.geomspace(10, 4000, 100)
    performance = sigmoid_curve(compute, **truth) + rng.normal(0, 0.005, compute.size)
    early = compute <= 1500  # fit on the first part of the run only
    fit = fit_sigmoid(compute[early], performance[early], r0=0.1, skip_compute=50)
    assert fit.a == pytest.approx(truth["a"], abs=0.02)
    assert fit.b == pytest.approx(truth["b"], rel=0.15)
    assert fit.c_mid == pytest.approx(truth["c_mid"], rel=0.15)
    assert fit.fit_range[0] >= 50
    # The extrapolation predicts the unseen end of the run.
    late = ~early
    assert np.abs(fit.predict(compute[late]) - performance[late]).max() < 0.03
    png = plot_sigmoid_fit(compute, performance, fit, tmp_path / "fit.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigmoid_fit_validates_input():
    with pytest.raises(ValueError, match="skip_compute"):
        fit_sigmoid([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], skip_compute=3)
    with pytest.raises(ValueError, match="> 0"):
        fit_sigmoid([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4])
