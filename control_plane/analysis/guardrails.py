"""Guardrails: error-rate and p99-latency tests against the user's margins, in both directions.

Non-inferiority (the canary is not worse than the margin) is required to promote; harm (the canary is worse
than the margin) rolls back at once. Both are always-valid, so they can be checked at every tick.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from control_plane.analysis import sequential as seq
from control_plane.analysis.aggregates import LatencyHistogram

Array = np.ndarray | float


# Beta prior over the canary's error rate (mean 5 %, as concentrated as 60 requests' worth): most sensitive to
# a few points worse; chosen with `recsys simulate` (errors +5 pts rolled back within two evaluations).
HARM_PRIOR = (3.0, 57.0)


def log_rate_evidence(x: Array, n: Array, p0: Array, prior: tuple[float, float] = HARM_PRIOR) -> np.ndarray:
    """log e-value that a Bernoulli rate exceeds p0: a Beta mixture, truncated to (p0, 1], of likelihood ratios."""
    # Each ratio against p0 is a supermartingale whenever the true rate is at most p0, so the mixture is too:
    # by Ville's inequality it exceeds 1/alpha with probability at most alpha at any look, exactly (no CLT),
    # for a *known* p0. That is a one-sample guarantee; see `rate_tests` for what it means with p0 taken
    # from the baseline's observed rate.
    x, n = np.asarray(x, dtype=float), np.asarray(n, dtype=float)
    p0 = np.clip(np.asarray(p0, dtype=float), 1e-9, 1 - 1e-9)
    a, b = prior
    with np.errstate(divide="ignore"):
        num = special.betaln(x + a, n - x + b) + np.log(special.betaincc(x + a, n - x + b, p0))
        den = (
            special.betaln(a, b)
            + np.log(special.betaincc(a, b, p0))
            + x * np.log(p0)
            + (n - x) * np.log1p(-p0)
        )
    return num - den


def restricted_variance(x_b: Array, n_b: Array, n_c: Array, theta0: Array) -> np.ndarray:
    """Variance of the error-rate difference if the canary's rate were exactly the baseline's plus theta0."""
    x_b, n_b, n_c = (np.asarray(a, dtype=float) for a in (x_b, n_b, n_c))
    # Farrington-Manning style: judging a margin with the variance the margin implies keeps the test
    # calibrated at the boundary; for non-inferiority it is conservative when the canary has few errors.
    pb = (x_b + 0.5) / (n_b + 1.0)
    pc = np.clip(pb + theta0, 1e-6, 1 - 1e-6)
    return pc * (1 - pc) / np.maximum(n_c, 1) + pb * (1 - pb) / np.maximum(n_b, 1)


def _rates(x_c: Array, n_c: Array, x_b: Array, n_b: Array) -> tuple[np.ndarray, ...]:
    x_c, n_c, x_b, n_b = (np.asarray(a, dtype=float) for a in (x_c, n_c, x_b, n_b))
    return x_c, n_c, x_b, n_b, x_c / np.maximum(n_c, 1), x_b / np.maximum(n_b, 1)


def rate_tests(
    x_c: Array, n_c: Array, x_b: Array, n_b: Array, margin: float, alpha: float, expected_n: float
) -> dict[str, np.ndarray]:
    """Error-rate difference with always-valid p-values for harm (diff > margin) and non-inferiority (< margin).

    What `p_harm` guarantees, exactly: it is the one-sample e-value test of "the canary's error rate is at
    most p0" with p0 = the baseline's *observed* rate + margin, re-read at each look. If the baseline's
    true rate were known and plugged in, a canary within the margin would ever be rolled back with
    probability at most harm_alpha, at any number of looks, for any sample size (Ville's inequality; no
    normal approximation). With the observed rate plugged in it is not a two-sample guarantee: the
    baseline's own sampling error (it serves ~8 times the canary's traffic at the first step) is not
    covered, and `recsys simulate` measures the false-rollback rate instead — about 10 % with the canary
    exactly at the margin and under 1 % with the canary equal to the baseline, at harm_alpha 0.2. A
    time-uniform upper bound on the baseline's rate would make it exactly valid for two samples, but
    would catch a +5-point regression within two evaluations in only ~75 % of runs at 20 requests/s.
    """
    x_c, n_c, x_b, n_b, rc, rb = _rates(x_c, n_c, x_b, n_b)
    v0 = restricted_variance(x_b, n_b, n_c, margin)
    tau2 = seq.mixing_variance(v0 * np.maximum(n_c, 1), expected_n, alpha)
    return {
        "diff": rc - rb,
        "p_harm": _harm_p(x_c, n_c, rb + margin),
        "p_noninferior": seq.one_sided_p(rc - rb, v0, tau2, margin, -1),
        "tau2": tau2,
    }


def _harm_p(x: np.ndarray, n: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """min(1, 1/e-value) of "rate above p0"; 1 without computing where the observed rate is at most p0
    (every ratio in the mixture is then at most 1, so the e-value is too)."""
    x, n, p0 = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (x, n, p0)))
    out = np.ones(x.shape)
    live = x > n * p0
    if live.any():
        out[live] = np.minimum(1.0, np.exp(-log_rate_evidence(x[live], n[live], p0[live])))
    return out


def rate_bounds(
    x_c: Array, n_c: Array, x_b: Array, n_b: Array, tau2: Array, alpha: float, harm_alpha: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The always-valid lower (harm, at harm_alpha) and upper (non-inferiority, at alpha) bounds on the
    difference, matching `rate_tests`."""
    x_c, n_c, x_b, n_b, rc, rb = _rates(x_c, n_c, x_b, n_b)
    target = np.log(1.0 / alpha)
    harm_target = np.log(1.0 / (alpha if harm_alpha is None else harm_alpha))

    def harm(theta0: np.ndarray) -> np.ndarray:
        return log_rate_evidence(x_c, n_c, rb + theta0) >= harm_target

    def noninferior(theta0: np.ndarray) -> np.ndarray:
        v0 = restricted_variance(x_b, n_b, n_c, theta0)
        return seq.log_one_sided_lr((theta0 - (rc - rb)) / np.sqrt(v0), tau2 / v0) >= target

    lower = _boundary(harm, -rb, rc - rb)
    upper = _boundary(noninferior, 1.0 - rb, rc - rb)
    return lower, upper


def _boundary(rejects, far: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Bisect for where `rejects` switches on between `near` (not rejected) and `far` (no bound if not rejected)."""
    far, near = np.array(far, dtype=float), np.array(near, dtype=float)
    edge = far.copy()
    for _ in range(60):
        mid = 0.5 * (far + near)
        r = rejects(mid)
        far, near = np.where(r, mid, far), np.where(r, near, mid)
    return np.where(rejects(edge), 0.5 * (far + near), edge)


def quantile_ranks(n: Array, q: float, alpha: float, expected_n: float) -> tuple[np.ndarray, np.ndarray]:
    """1-based order-statistic ranks bounding the q-quantile at every look, each side one-sided at alpha."""
    # The count of samples at or below the true quantile is Binomial(n, q) at every n; a time-uniform
    # normal-mixture boundary on that count (Howard & Ramdas 2022) turns order statistics into bounds that
    # hold at every look. A lower rank below 1 or an upper rank above n means "no bound yet".
    n = np.asarray(n, dtype=float)
    var = q * (1 - q) / np.maximum(n, 1)
    tau2 = seq.mixing_variance(q * (1 - q), expected_n, alpha)
    u = n * seq.one_sided_z(tau2 / var, alpha) * np.sqrt(var)
    return np.ceil(n * q - u), np.floor(n * q + u) + 1


def quantile_bounds(
    values: np.ndarray | LatencyHistogram, q: float, alpha: float, expected_n: float
) -> tuple[float, float, float]:
    """Point estimate, lower and upper always-valid bound of the q-quantile of one sample (inf: no bound yet).

    `values` is the sample itself or its histogram; from a histogram each order statistic is within the
    histogram's relative accuracy (1 %) of the sample's.
    """
    if isinstance(values, LatencyHistogram):
        n, at = values.count, values.value_at_rank
    else:
        x = np.sort(np.asarray(values, dtype=float))
        n = len(x)

        def at(rank: int) -> float:
            return float(x[rank - 1])

    if n == 0:
        return float("nan"), 0.0, float("inf")
    lo_rank, hi_rank = quantile_ranks(n, q, alpha, expected_n)
    point = at(int(min(n, max(1, np.ceil(n * q)))))
    lo = at(int(lo_rank)) if lo_rank >= 1 else 0.0
    hi = at(int(hi_rank)) if hi_rank <= n else float("inf")
    return float(point), float(lo), float(hi)


def ratio_bounds(lo_c: Array, hi_c: Array, lo_b: Array, hi_b: Array) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on canary/baseline from each arm's quantile bounds (each at alpha/2, so jointly at alpha)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = np.where(
            np.asarray(hi_b) > 0, np.asarray(lo_c, dtype=float) / np.asarray(hi_b, dtype=float), 0.0
        )
        upper = np.where(
            np.asarray(lo_b) > 0, np.asarray(hi_c, dtype=float) / np.asarray(lo_b, dtype=float), np.inf
        )
    return np.where(np.isnan(lower), 0.0, lower), np.where(np.isnan(upper), np.inf, upper)


def p99_ratio(
    lat_c: np.ndarray | LatencyHistogram,
    lat_b: np.ndarray | LatencyHistogram,
    alpha: float,
    expected_n: float,
    harm_expected_n: float,
    q: float = 0.99,
    harm_alpha: float | None = None,
) -> dict[str, float]:
    """Canary/baseline p99 with an always-valid lower bound (for harm, at harm_alpha) and upper bound (for
    non-inferiority, at alpha)."""
    ha = alpha if harm_alpha is None else harm_alpha
    p_c, lo_c_h, _ = quantile_bounds(lat_c, q, ha / 2, harm_expected_n)
    p_b, _, hi_b_h = quantile_bounds(lat_b, q, ha / 2, harm_expected_n)
    _, _, hi_c = quantile_bounds(lat_c, q, alpha / 2, expected_n)
    _, lo_b, _ = quantile_bounds(lat_b, q, alpha / 2, expected_n)
    lower, _ = ratio_bounds(lo_c_h, 0.0, 1.0, hi_b_h)
    _, upper = ratio_bounds(0.0, hi_c, lo_b, 1.0)
    ratio = p_c / p_b if p_b > 0 else float("nan")
    return {
        "p99_canary": p_c,
        "p99_baseline": p_b,
        "ratio": ratio,
        "lower": float(lower),
        "upper": float(upper),
    }
