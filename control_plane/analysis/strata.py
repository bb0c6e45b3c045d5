"""Ramp-aware estimation: the canary's difference within each period of constant weights, then combined.

While a canary ramps (10 % → 25 % → 50 %), its data lean to later times; pooled counts then mix the
difference between the arms with whatever changed over time (a trend, the daily cycle), and a trend
common to both arms biases the pooled difference (Simpson's paradox). Within one period of constant
weights both arms are sampled at the same moments, so a common trend cancels in that period's difference.

The periods' differences are combined with inverse-variance weights. With d_s the period's difference and
v_s its variance, S = sum d_s / v_s has variance I = sum 1 / v_s, and both grow by independent increments
as data arrive (a closed period never changes; the open one adds to its own sums), so S is a Gaussian
martingale in information time I — exactly what the normal-mixture test (sequential.py) needs, with the
estimate S / I and its variance 1 / I. The tests on the combined statistic stay always valid.

The seam: every function takes each arm's per-period *mean and variance of the mean*, not counts, so a
per-user (delta-method) variance can replace the per-prediction one without touching the combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray | float

MIN_PERIOD_LABELS = 1  # a period whose arm has fewer labels carries no weight (its difference is unknown)


@dataclass(frozen=True)
class ArmPeriods:
    """One arm's per-period summaries, arrays of shape (..., periods): size, mean and variance of the mean."""

    n: np.ndarray
    mean: np.ndarray
    var: np.ndarray


@dataclass(frozen=True)
class Combined:
    """The combined difference and its variance, with every period's own difference and variance."""

    diff: np.ndarray
    var: np.ndarray
    period_diff: np.ndarray  # NaN where a period has no data in one arm
    period_var: np.ndarray  # inf where a period has no data in one arm


def proportion_periods(correct: Array, labelled: Array) -> ArmPeriods:
    """Per-period accuracy of one arm, the variance of each period's mean from the arm's pooled accuracy.

    The pooled accuracy (over all periods, smoothed as (x + 0.5) / (n + 1)) stands in for each period's
    Bernoulli variance: a period with a handful of labels would otherwise claim a variance of almost 0.
    """
    x, n = np.asarray(correct, dtype=float), np.asarray(labelled, dtype=float)
    pooled = (x.sum(axis=-1, keepdims=True) + 0.5) / (n.sum(axis=-1, keepdims=True) + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, x / np.maximum(n, 1), np.nan)
        var = np.where(n >= MIN_PERIOD_LABELS, pooled * (1 - pooled) / np.maximum(n, 1), np.inf)
    return ArmPeriods(n, mean, var)


def combine(canary: ArmPeriods, baseline: ArmPeriods) -> Combined:
    """Inverse-variance combination of the per-period differences (periods on the last axis)."""
    usable = np.isfinite(canary.var) & np.isfinite(baseline.var)
    d = np.where(usable, np.nan_to_num(canary.mean) - np.nan_to_num(baseline.mean), np.nan)
    v = np.where(usable, canary.var + baseline.var, np.inf)
    w = np.where(usable, 1.0 / np.where(usable, v, 1.0), 0.0)
    info = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where(info > 0, (w * np.nan_to_num(d)).sum(axis=-1) / np.maximum(info, 1e-300), 0.0)
        var = np.where(info > 0, 1.0 / np.maximum(info, 1e-300), np.inf)
    # no data at all: the same "no difference, huge variance" the pooled estimate gives
    var = np.where(np.isfinite(var), var, 0.25)
    return Combined(diff, var, d, v)


def period_at(period_diff: np.ndarray, period_var: np.ndarray, index: Array) -> tuple[np.ndarray, np.ndarray]:
    """One period's own difference and variance per row (`index` picks the period, e.g. the current step)."""
    idx = np.minimum(np.asarray(index, dtype=np.int64), np.shape(period_diff)[-1] - 1)
    d = np.take_along_axis(np.atleast_2d(period_diff), np.atleast_1d(idx)[..., None], axis=-1)[..., 0]
    v = np.take_along_axis(np.atleast_2d(period_var), np.atleast_1d(idx)[..., None], axis=-1)[..., 0]
    v = np.where(np.isfinite(v), v, 0.25)
    return np.nan_to_num(d).reshape(idx.shape), v.reshape(idx.shape)
