"""Error-rate and p99 guardrails: exact values, consistency of bounds and tests, and level under peeking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from control_plane.analysis import guardrails as g


def test_rate_evidence_is_the_truncated_beta_mixture_integral():
    x, n, p0, (a, b) = 4, 120, 0.01, g.HARM_PRIOR

    def integrand(p: float) -> float:
        ratio = (p / p0) ** x * ((1 - p) / (1 - p0)) ** (n - x)
        return ratio * stats.beta.pdf(p, a, b) / special.betaincc(a, b, p0)

    numeric, _ = integrate.quad(integrand, p0, 1, points=[x / n], limit=200)
    assert math.exp(float(g.log_rate_evidence(x, n, p0))) == pytest.approx(numeric, rel=1e-6)


def test_harm_test_keeps_its_level_at_the_margin_at_every_look():
    rng = np.random.default_rng(3)
    errors = rng.binomial(100, 0.0105, (4_000, 200)).cumsum(axis=1)
    n = 100 * np.arange(1, 201)
    rejected = (g.log_rate_evidence(errors, n, 0.0105) >= math.log(20)).any(axis=1)
    assert rejected.mean() <= 0.05


@pytest.mark.parametrize(
    "case, errors_c, requests_c, harm, noninferior",
    [
        ("5 points worse after 240 requests is harm", 13, 240, True, False),
        ("equal rates over a small sample is neither", 1, 240, False, False),
        ("equal rates over a large sample is non-inferior", 300, 60_000, False, True),
        ("1 point worse over a large sample is harm", 900, 60_000, True, False),
    ],
)
def test_rate_tests(case, errors_c, requests_c, harm, noninferior):
    out = g.rate_tests(errors_c, requests_c, 270, 54_000, 0.005, 0.05, 20_000)
    assert (float(out["p_harm"]) <= 0.05) is harm, case
    assert (float(out["p_noninferior"]) <= 0.05) is noninferior, case


@pytest.mark.parametrize("errors_c, requests_c", [(13, 240), (9, 240), (300, 60_000), (380, 60_000)])
def test_rate_bounds_agree_with_the_tests(errors_c, requests_c):
    out = g.rate_tests(errors_c, requests_c, 270, 54_000, 0.005, 0.05, 20_000)
    lower, upper = g.rate_bounds(errors_c, requests_c, 270, 54_000, out["tau2"], 0.05)
    assert (float(lower) > 0.005) == (float(out["p_harm"]) <= 0.05)
    assert (float(upper) < 0.005) == (float(out["p_noninferior"]) <= 0.05)
    assert float(lower) <= float(out["diff"]) <= float(upper)


@pytest.mark.parametrize("errors_c", [7, 8, 9, 10])
def test_the_harm_bound_follows_harm_alpha_and_the_noninferiority_bound_alpha(errors_c):
    out = g.rate_tests(errors_c, 240, 270, 54_000, 0.005, 0.05, 20_000)
    lower, upper = g.rate_bounds(errors_c, 240, 270, 54_000, out["tau2"], 0.05, harm_alpha=0.1)
    _, same_upper = g.rate_bounds(errors_c, 240, 270, 54_000, out["tau2"], 0.05)
    assert (float(lower) > 0.005) == (float(out["p_harm"]) <= 0.1)
    assert float(upper) == pytest.approx(float(same_upper))


def test_a_looser_harm_alpha_gives_a_higher_p99_lower_bound():
    rng = np.random.default_rng(2)
    base = rng.lognormal(3.0, 0.4, 2_000)
    strict = g.p99_ratio(base * 1.2, base, 0.05, 20_000, 500)
    loose = g.p99_ratio(base * 1.2, base, 0.05, 20_000, 500, harm_alpha=0.2)
    assert loose["lower"] >= strict["lower"] and loose["upper"] == strict["upper"]


def test_quantile_ranks_approach_the_binomial_interval_and_are_wider():
    n, q = 100_000, 0.99
    lo, hi = g.quantile_ranks(n, q, 0.025, 100_000)
    half = 1.96 * math.sqrt(n * q * (1 - q))
    assert hi - n * q > half and n * q - lo > half  # always-valid: wider than a one-look interval
    assert hi - n * q < 2 * half


def test_quantile_bounds_on_a_known_sample():
    point, lo, hi = g.quantile_bounds(np.arange(1, 10_001, dtype=float), 0.99, 0.025, 10_000)
    assert point == 9900
    assert 9800 < lo < 9900 < hi < 10_000
    assert (
        g.quantile_bounds(np.arange(50.0), 0.99, 0.025, 10_000)[2] == math.inf
    )  # too few for an upper bound


def test_p99_confidence_sequence_covers_the_true_quantile_at_every_look():
    rng = np.random.default_rng(5)
    truth = math.exp(0.4 * stats.norm.ppf(0.99))
    misses = 0
    runs = 150
    for _ in range(runs):
        x = np.exp(0.4 * rng.standard_normal(20_000))
        for n in range(500, 20_001, 500):
            _, lo, hi = g.quantile_bounds(x[:n], 0.99, 0.05, 5_000)
            if not lo <= truth <= hi:
                misses += 1
                break
    assert misses / runs <= 0.10  # two sides at 0.05 each


@pytest.mark.parametrize(
    "case, ratio, harm, noninferior",
    [
        ("the same latencies are non-inferior", 1.0, False, True),
        ("30% slower is harm", 1.3, True, False),
    ],
)
def test_p99_ratio(case, ratio, harm, noninferior):
    u = (np.arange(60_000) + 0.5) / 60_000
    base = 20 * np.exp(0.4 * stats.norm.ppf(u))
    out = g.p99_ratio(base * ratio, base, 0.05, 20_000, 500)
    assert out["ratio"] == pytest.approx(ratio, rel=1e-6)
    assert (out["lower"] > 1.05) is harm, case
    assert (out["upper"] <= 1.05) is noninferior, case
    assert out["lower"] <= out["ratio"] <= out["upper"]
