"""Guardrails: error-rate and p99-latency tests against the user's margins, in both directions.

Non-inferiority (the canary is not worse than the margin) is required to promote; harm (the canary is worse
than the margin) rolls back at once. Both are always-valid, so they can be checked at every tick.
"""

from __future__ import annotations

import numpy as np

from control_plane.analysis import sequential as seq

Array = np.ndarray | float


def restricted_variance(x_b: Array, n_b: Array, n_c: Array, theta0: Array) -> np.ndarray:
    """Variance of the error-rate difference if the canary's rate were exactly the baseline's plus theta0."""
    x_b, n_b, n_c = (np.asarray(a, dtype=float) for a in (x_b, n_b, n_c))
    # Farrington-Manning style: judging a margin with the variance the margin implies keeps rare-event
    # tests calibrated at the boundary and far more sensitive than the canary's own noisy variance.
    pb = (x_b + 0.5) / (n_b + 1.0)
    pc = np.clip(pb + theta0, 1e-6, 1 - 1e-6)
    return pc * (1 - pc) / np.maximum(n_c, 1) + pb * (1 - pb) / np.maximum(n_b, 1)


def rate_tests(
    x_c: Array, n_c: Array, x_b: Array, n_b: Array, margin: float, alpha: float, expected_n: float, harm_expected_n: float
) -> dict[str, np.ndarray]:
    """Error-rate difference with its always-valid p-values: harm (diff > margin) and non-inferiority (< margin)."""
    x_c, n_c = np.asarray(x_c, dtype=float), np.asarray(n_c, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.where((n_c > 0) & (np.asarray(n_b) > 0), x_c / np.maximum(n_c, 1) - np.asarray(x_b) / np.maximum(n_b, 1), 0.0)
    v0 = restricted_variance(x_b, n_b, n_c, margin)
    unit = v0 * np.maximum(n_c, 1)
    tau2_harm = seq.mixing_variance(unit, harm_expected_n, alpha)
    tau2_ni = seq.mixing_variance(unit, expected_n, alpha)
    return {
        "diff": diff,
        "p_harm": seq.one_sided_p(diff, v0, tau2_harm, margin, +1),
        "p_noninferior": seq.one_sided_p(diff, v0, tau2_ni, margin, -1),
        "tau2_harm": tau2_harm,
        "tau2_noninferior": tau2_ni,
    }


def rate_bound(
    x_c: Array, n_c: Array, x_b: Array, n_b: Array, tau2: Array, alpha: float, side: int
) -> np.ndarray:
    """The always-valid bound on the rate difference that matches `rate_tests` (side=+1 lower, -1 upper)."""
    x_c, n_c, x_b, n_b = (np.asarray(a, dtype=float) for a in (x_c, n_c, x_b, n_b))
    diff = x_c / np.maximum(n_c, 1) - x_b / np.maximum(n_b, 1)
    pb = (x_b + 0.5) / (n_b + 1.0)
    target = np.log(1.0 / alpha)

    def rejects(theta0: np.ndarray) -> np.ndarray:
        v0 = restricted_variance(x_b, n_b, n_c, theta0)
        return seq.log_one_sided_lr(side * (diff - theta0) / np.sqrt(v0), tau2 / v0) >= target

    # side=+1: thetas below the bound are rejected; search between the lowest possible difference and diff.
    far = np.where(side > 0, -pb, 1.0 - pb) + 0.0 * diff
    near = diff.copy()
    if not np.any(rejects(far)):
        return np.broadcast_to(far, np.shape(diff)).astype(float)
    for _ in range(60):
        mid = 0.5 * (far + near)
        r = rejects(mid)
        far, near = np.where(r, mid, far), np.where(r, near, mid)
    return np.where(rejects(far), 0.5 * (far + near), far)


def quantile_ranks(n: Array, q: float, alpha: float, expected_n: float) -> tuple[np.ndarray, np.ndarray]:
    """1-based order-statistic ranks of a one-sided-alpha confidence sequence for the q-quantile, each side.

    The count of samples at or below the true quantile is Binomial(n, q) at every n; a time-uniform
    normal-mixture boundary on that count (Howard & Ramdas 2022) turns order statistics into bounds that
    hold at every look. A lower rank below 1 or an upper rank above n means "no bound yet".
    """
    n = np.asarray(n, dtype=float)
    var = q * (1 - q) / np.maximum(n, 1)
    tau2 = seq.mixing_variance(q * (1 - q), expected_n, alpha)
    u = n * seq.one_sided_z(tau2 / var, alpha) * np.sqrt(var)
    return np.ceil(n * q - u), np.floor(n * q + u) + 1


def quantile_bounds(values: np.ndarray, q: float, alpha: float, expected_n: float) -> tuple[float, float, float]:
    """Point estimate, lower and upper always-valid bound of the q-quantile of one sample (inf: no bound yet)."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return float("nan"), 0.0, float("inf")
    lo_rank, hi_rank = quantile_ranks(n, q, alpha, expected_n)
    point = x[int(min(n, max(1, np.ceil(n * q)))) - 1]
    lo = x[int(lo_rank) - 1] if lo_rank >= 1 else 0.0
    hi = x[int(hi_rank) - 1] if hi_rank <= n else float("inf")
    return float(point), float(lo), float(hi)


def ratio_bounds(lo_c: Array, hi_c: Array, lo_b: Array, hi_b: Array) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on canary/baseline from each arm's quantile bounds (each at alpha/2, so jointly at alpha)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = np.where(np.asarray(hi_b) > 0, np.asarray(lo_c, dtype=float) / np.asarray(hi_b, dtype=float), 0.0)
        upper = np.where(np.asarray(lo_b) > 0, np.asarray(hi_c, dtype=float) / np.asarray(lo_b, dtype=float), np.inf)
    return np.nan_to_num(lower, nan=0.0), np.nan_to_num(upper, nan=np.inf)


def p99_ratio(
    lat_c: np.ndarray, lat_b: np.ndarray, alpha: float, expected_n: float, harm_expected_n: float, q: float = 0.99
) -> dict[str, float]:
    """Canary/baseline p99 with an always-valid lower bound (for harm) and upper bound (for non-inferiority)."""
    p_c, lo_c_h, _ = quantile_bounds(lat_c, q, alpha / 2, harm_expected_n)
    p_b, _, hi_b_h = quantile_bounds(lat_b, q, alpha / 2, harm_expected_n)
    _, _, hi_c = quantile_bounds(lat_c, q, alpha / 2, expected_n)
    _, lo_b, _ = quantile_bounds(lat_b, q, alpha / 2, expected_n)
    lower, _ = ratio_bounds(lo_c_h, 0.0, 1.0, hi_b_h)
    _, upper = ratio_bounds(0.0, hi_c, lo_b, 1.0)
    ratio = p_c / p_b if p_b > 0 else float("nan")
    return {"p99_canary": p_c, "p99_baseline": p_b, "ratio": ratio, "lower": float(lower), "upper": float(upper)}
