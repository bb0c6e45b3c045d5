"""The normal-mixture mSPRT and its confidence sequences against hand-computed values and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from control_plane.analysis import sequential as seq


def test_mixture_ratio_matches_the_hand_computed_value():
    # sqrt(V/(V+tau2)) * exp(tau2 d^2 / (2 V (V+tau2))) = sqrt(0.2) * exp(1.6)
    lr = seq.mixture_lr(0.02, 1e-4, 4e-4, 0.0)
    assert lr == pytest.approx(math.sqrt(0.2) * math.exp(1.6), rel=1e-12)
    assert lr == pytest.approx(2.21505, rel=1e-5)


def test_boundary_matches_the_hand_computed_half_width():
    # sqrt(V (V+tau2)/tau2 * (2 ln(1/alpha) + ln((V+tau2)/V))) = sqrt(1.25e-4 * (2 ln 20 + ln 5))
    h = seq.cs_half_width(1e-4, 4e-4, 0.05)
    assert h == pytest.approx(math.sqrt(1.25e-4 * (2 * math.log(20) + math.log(5))), rel=1e-12)
    assert h == pytest.approx(0.030824, rel=1e-4)
    assert seq.mixture_lr(0.02 + h, 1e-4, 4e-4, 0.02) == pytest.approx(20.0, rel=1e-9)
    lo, hi = seq.confidence_sequence(0.02, 1e-4, 4e-4, 0.05)
    assert (lo, hi) == pytest.approx((0.02 - h, 0.02 + h))


def test_mixing_ratio_is_the_fixed_point_that_minimises_the_boundary():
    r = seq.mixing_ratio(0.05)
    assert r == pytest.approx(2 * math.log(20) + math.log1p(r), rel=1e-12)
    var = 0.34 / 20_000  # the variance at the expected sample
    grid = np.geomspace(0.1, 100, 2001) * var
    best = grid[np.argmin(seq.cs_half_width(var, grid, 0.05))]
    assert float(seq.mixing_variance(0.34, 20_000, 0.05)) == pytest.approx(best, rel=0.01)


def test_one_sided_ratio_is_the_half_normal_mixture_integral():
    z, r, var = 1.7, 3.0, 1.0
    tau = math.sqrt(r * var)

    def integrand(delta: float) -> float:
        return math.exp(delta * z - delta**2 / 2) * 2 * stats.norm.pdf(delta, 0, tau)

    numeric, _ = integrate.quad(integrand, 0, 50)
    assert math.exp(float(seq.log_one_sided_lr(z, r))) == pytest.approx(numeric, rel=1e-8)


def test_critical_z_table_agrees_with_the_exact_solution():
    r = np.geomspace(1e-3, 1e6, 50)
    assert seq.one_sided_z(r, 0.05) == pytest.approx(seq.one_sided_z(r, 0.05, exact=True), rel=1e-5)
    exact = seq.one_sided_z(np.array([2.0]), 0.05, exact=True)
    assert float(seq.log_one_sided_lr(exact, 2.0)[0]) == pytest.approx(math.log(20), abs=1e-9)


def test_one_sided_bound_and_p_value_agree():
    diff, var, tau2 = 0.024, 2.5e-5, 1e-4
    lower = float(seq.one_sided_bound(diff, var, tau2, 0.05, +1))
    assert float(seq.one_sided_p(diff, var, tau2, lower - 1e-6, +1)) < 0.05
    assert float(seq.one_sided_p(diff, var, tau2, lower + 1e-6, +1)) > 0.05
    upper = float(seq.one_sided_bound(diff, var, tau2, 0.05, -1))
    assert upper == pytest.approx(2 * diff - lower)


def test_proportion_diff_and_variance():
    diff, var = seq.proportion_diff(80, 100, 780, 1000)
    assert float(diff) == pytest.approx(0.02)
    pc, pb = 80.5 / 101, 780.5 / 1001
    assert float(var) == pytest.approx(pc * (1 - pc) / 100 + pb * (1 - pb) / 1000)
    assert float(seq.proportion_diff(0, 10, 0, 10)[1]) > 0  # never a zero variance


def test_running_p_value_only_decreases():
    ps = seq.always_valid_p(np.array([0.5, 4.0, 30.0, 2.0]))
    assert list(np.minimum.accumulate(ps)) == pytest.approx([1.0, 0.25, 1 / 30, 1 / 30])
    assert float(seq.running_p(0.2, 0.5)) == 0.2


def _paths(rng, runs, looks, batch, p_c, p_b):
    """Cumulative successes of two arms at each look: (runs, looks) each."""
    x_c = rng.binomial(batch, p_c, (runs, looks)).cumsum(axis=1)
    x_b = rng.binomial(batch * 4, p_b, (runs, looks)).cumsum(axis=1)
    n_c = batch * np.arange(1, looks + 1)
    return x_c, n_c, x_b, 4 * n_c


def test_confidence_sequence_covers_the_truth_at_every_look_at_once():
    rng = np.random.default_rng(7)
    x_c, n_c, x_b, n_b = _paths(rng, 2000, 200, 50, 0.80, 0.78)
    diff, var = seq.proportion_diff(x_c, n_c, x_b, n_b)
    tau2 = seq.mixing_variance(0.34, 5_000, 0.05)
    lo, hi = seq.confidence_sequence(diff, var, tau2, 0.05)
    truth = 0.02
    ever_missed = np.any((lo > truth) | (hi < truth), axis=1).mean()
    assert ever_missed <= 0.05
    one_sided_missed = np.any(seq.one_sided_bound(diff, var, tau2, 0.05, +1) > truth, axis=1).mean()
    assert one_sided_missed <= 0.05
    # the fixed-sample 95% interval, looked at every time, misses far more often
    z = 1.96 * np.sqrt(var)
    assert np.any((diff - z > truth) | (diff + z < truth), axis=1).mean() > 0.2


def test_superiority_test_keeps_its_level_at_the_margin_under_continuous_looks():
    rng = np.random.default_rng(11)
    x_c, n_c, x_b, n_b = _paths(rng, 2000, 200, 50, 0.79, 0.78)  # true gain = the 1-point margin
    diff, var = seq.proportion_diff(x_c, n_c, x_b, n_b)
    p = seq.one_sided_p(diff, var, seq.mixing_variance(0.34, 5_000, 0.05), 0.01, +1)
    assert (p.min(axis=1) <= 0.05).mean() <= 0.05
