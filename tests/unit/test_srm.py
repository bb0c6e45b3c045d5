"""Sample-ratio mismatch: the chi-square against scipy, its always-valid version, and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from control_plane.analysis import srm

WEIGHTS = {"baseline": 85, "canary": 10, "control": 5}


@pytest.mark.parametrize(
    "counts",
    [(850, 100, 50), (800, 150, 50), (8_600, 900, 500), (40_000, 5_200, 2_600)],
)
def test_chi_square_p_value_matches_scipy(counts):
    observed = dict(zip(("baseline", "canary", "control"), counts, strict=True))
    expected = np.array([85, 10, 5]) / 100 * sum(counts)
    want = stats.chisquare(counts, expected).pvalue
    assert srm.srm_p_value(observed, WEIGHTS) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert srm.srm_p_values(np.array([counts]), np.array([85, 10, 5]))[0] == pytest.approx(
        want, rel=1e-9, abs=1e-300
    )


def test_no_verdict_while_an_arm_expects_fewer_than_five():
    assert srm.srm_p_value({"baseline": 60, "canary": 8, "control": 2}, WEIGHTS) is None
    assert srm.srm_check({"baseline": 60, "canary": 8, "control": 2}, WEIGHTS, 20_000, 0.001) is None


def test_traffic_to_a_role_weighted_zero_is_a_mismatch():
    assert srm.srm_p_value({"baseline": 1_000, "canary": 3}, {"baseline": 100, "canary": 0}) == 0.0


def test_roles_missing_from_the_counts_count_as_zero():
    p = srm.srm_p_value({"baseline": 1_000}, {"baseline": 90, "canary": 10})
    assert p is not None and p < 1e-10


def test_always_valid_p_is_never_smaller_than_the_fixed_one():
    rng = np.random.default_rng(1)
    counts = rng.poisson([850, 100, 50], (500, 3)) * rng.integers(1, 50, (500, 1))
    fixed = srm.srm_p_values(counts, np.array([85, 10, 5]))
    valid = srm.always_valid_srm_p(counts, np.array([85, 10, 5]), 20_000, 0.001)
    assert np.all(valid >= fixed - 1e-15)


def test_checking_every_minute_rarely_halts_a_sound_split_but_catches_a_mismatch():
    rng = np.random.default_rng(2)
    runs, w = 5_000, np.array([85, 10, 5])

    def ever(rates: np.ndarray) -> tuple[float, float]:
        counts = np.zeros((runs, 3))
        fixed_min, valid_min = np.ones(runs), np.ones(runs)
        for _ in range(240):
            counts += rng.poisson(rates, (runs, 3))
            fixed_min = np.minimum(fixed_min, srm.srm_p_values(counts, w))
            valid_min = np.minimum(valid_min, srm.always_valid_srm_p(counts, w, 20_000, 0.001))
        return float((fixed_min < 0.001).mean()), float((valid_min < 0.001).mean())

    fixed, valid = ever(np.array([1020.0, 120.0, 60.0]))
    assert valid <= 0.002
    assert fixed > valid  # the fixed-sample test, peeked at, halts sound rollouts more often
    assert ever(np.array([1020.0, 108.0, 60.0]))[1] > 0.9  # the canary loses 10% of its requests
