"""Always-valid inference for a difference of means: the normal-mixture mSPRT and its confidence sequences.

Johari et al. (2017), "Peeking at A/B tests"; Howard et al. (2021), "Time-uniform, nonparametric,
nonasymptotic confidence sequences". Every function takes numpy arrays (or floats) and broadcasts, so the
simulation can evaluate a thousand replications at once with the same code that decides a real rollout.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import special

Array = np.ndarray | float

_LOG2 = float(np.log(2.0))


def mixing_ratio(alpha: float) -> float:
    """The r = tau²/V at which the mixture boundary is tightest: the root of r = 2 ln(1/alpha) + ln(1 + r)."""
    c = 2.0 * np.log(1.0 / alpha)
    r = c
    for _ in range(100):  # a contraction: converges to machine precision in well under 100 steps
        r = c + np.log1p(r)
    return float(r)


def mixing_variance(unit_variance: Array, expected_n: float, alpha: float) -> Array:
    """tau² for a mixture tuned to decide at `expected_n` observations of per-observation variance `unit_variance`."""
    return mixing_ratio(alpha) * np.asarray(unit_variance, dtype=float) / float(expected_n)


def proportion_diff(x_c: Array, n_c: Array, x_b: Array, n_b: Array) -> tuple[np.ndarray, np.ndarray]:
    """Canary minus baseline proportion and the variance of that difference (unpooled, never exactly zero)."""
    x_c, n_c, x_b, n_b = (np.asarray(a, dtype=float) for a in (x_c, n_c, x_b, n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where((n_c > 0) & (n_b > 0), x_c / np.maximum(n_c, 1) - x_b / np.maximum(n_b, 1), 0.0)
        # (x + 0.5) / (n + 1) keeps a 0/n or n/n arm from claiming zero variance
        pc, pb = (x_c + 0.5) / (n_c + 1.0), (x_b + 0.5) / (n_b + 1.0)
        var = pc * (1 - pc) / np.maximum(n_c, 1) + pb * (1 - pb) / np.maximum(n_b, 1)
    return diff, var


def mixture_lr(diff: Array, var: Array, tau2: Array, theta0: Array = 0.0) -> np.ndarray:
    """Two-sided normal-mixture likelihood ratio for H0: theta = theta0 (Johari et al. 2017, eq. 11)."""
    diff, var, tau2 = (np.asarray(a, dtype=float) for a in (diff, var, tau2))
    d = diff - theta0
    return np.sqrt(var / (var + tau2)) * np.exp(tau2 * d * d / (2.0 * var * (var + tau2)))


def log_one_sided_lr(z: Array, r: Array) -> np.ndarray:
    """log of the half-normal mixture ratio; z = (estimate - theta0)/sd toward the alternative, r = tau²/var."""
    z, r = np.asarray(z, dtype=float), np.asarray(r, dtype=float)
    return (
        _LOG2
        - 0.5 * np.log1p(r)
        + r * z * z / (2.0 * (1.0 + r))
        + special.log_ndtr(z * np.sqrt(r / (1.0 + r)))
    )


def one_sided_p(diff: Array, var: Array, tau2: Array, theta0: Array, side: int) -> np.ndarray:
    """Always-valid p-value for H0: side*(theta - theta0) <= 0 against side*(theta - theta0) > 0."""
    diff, var, tau2 = (np.asarray(a, dtype=float) for a in (diff, var, tau2))
    z = side * (diff - theta0) / np.sqrt(var)
    return np.minimum(1.0, np.exp(-log_one_sided_lr(z, tau2 / var)))


def always_valid_p(lr: Array) -> np.ndarray:
    """The p-value of one look: min(1, 1/Lambda); its running minimum stays valid under continuous monitoring."""
    return np.minimum(1.0, 1.0 / np.asarray(lr, dtype=float))


def running_p(previous: Array, current: Array) -> np.ndarray:
    """The running always-valid p-value: the smallest seen so far."""
    return np.minimum(previous, current)


def cs_half_width(var: Array, tau2: Array, alpha: float) -> np.ndarray:
    """Half-width of the two-sided confidence sequence: where the mixture ratio reaches 1/alpha."""
    var, tau2 = np.asarray(var, dtype=float), np.asarray(tau2, dtype=float)
    return np.sqrt(var * (var + tau2) / tau2 * (2.0 * np.log(1.0 / alpha) + np.log((var + tau2) / var)))


def confidence_sequence(diff: Array, var: Array, tau2: Array, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided (1 - alpha) confidence sequence for the difference: it covers it at every look at once."""
    h = cs_half_width(var, tau2, alpha)
    return np.asarray(diff, dtype=float) - h, np.asarray(diff, dtype=float) + h


def _solve_z(r: np.ndarray, alpha: float) -> np.ndarray:
    """z at which the one-sided mixture ratio reaches 1/alpha, by bisection (it increases with z)."""
    target = np.log(1.0 / alpha)
    lo, hi = np.zeros_like(r), np.full_like(r, 1.0)
    while np.any(grow := log_one_sided_lr(hi, r) < target):
        hi = np.where(grow, hi * 2.0, hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = log_one_sided_lr(mid, r) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


@lru_cache(maxsize=16)
def _z_table(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """z*(r) on a fine log grid of r, computed once per alpha (interpolating it is ~100x faster than solving)."""
    log_r = np.linspace(np.log(1e-8), np.log(1e10), 4001)
    return log_r, _solve_z(np.exp(log_r), alpha)


def one_sided_z(r: Array, alpha: float, exact: bool = False) -> np.ndarray:
    """The always-valid one-sided critical z for a mixture with r = tau²/var (grows slowly as data accrue)."""
    r = np.asarray(r, dtype=float)
    if exact:
        return _solve_z(np.atleast_1d(r), alpha).reshape(r.shape)
    log_r, z = _z_table(float(alpha))
    return np.interp(np.log(np.clip(r, 1e-8, 1e10)), log_r, z)


def one_sided_bound(diff: Array, var: Array, tau2: Array, alpha: float, side: int) -> np.ndarray:
    """Always-valid bound: side=+1 gives a lower bound (theta above it), side=-1 an upper bound."""
    var = np.asarray(var, dtype=float)
    return np.asarray(diff, dtype=float) - side * one_sided_z(np.asarray(tau2) / var, alpha) * np.sqrt(var)
