"""Sample-ratio mismatch: do the roles get the traffic their weights promise (chi-square goodness of fit)?

The chi-square statistic is judged two ways: its fixed-sample p-value (what a dashboard shows) and an
always-valid p-value from the normal-mixture bound on the same statistic, which is the one that halts, so
that checking every minute does not turn p < 0.001 into a few percent of false halts over a rollout.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from control_plane.analysis import sequential as seq

MIN_EXPECTED = 5.0  # below this per role the chi-square approximation is not trusted: no verdict


def chi_square(
    observed: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `observed` (rows x roles) against `weights`: (statistic, degrees of freedom, total, judgeable)."""
    obs = np.atleast_2d(np.asarray(observed, dtype=float))
    w = np.broadcast_to(np.asarray(weights, dtype=float), obs.shape)
    total = obs.sum(axis=1)
    share = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    expected = total[:, None] * share
    live = share > 0
    df = np.maximum(live.sum(axis=1) - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(live, (obs - expected) ** 2 / np.where(live, expected, 1.0), 0.0).sum(axis=1)
    stray = np.any(~live & (obs > 0), axis=1)  # traffic to a role weighted 0 is a mismatch by itself
    stat = np.where(stray, np.inf, stat)
    enough = stray | (
        np.all(np.where(live, expected >= MIN_EXPECTED, True), axis=1) & (live.sum(axis=1) >= 2)
    )
    return stat, df, total, enough


def srm_p_values(observed: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Fixed-sample chi-square p-values per row (1.0 while too few requests to judge)."""
    stat, df, _, enough = chi_square(observed, weights)
    return np.where(enough, stats.chi2.sf(stat, df), 1.0)


def always_valid_srm_p(
    observed: np.ndarray, weights: np.ndarray, expected_n: float, alpha: float
) -> np.ndarray:
    """Always-valid p-values per row: a (roles-1)-dimensional normal mixture over the chi-square statistic."""
    stat, df, total, enough = chi_square(observed, weights)
    r = seq.mixing_ratio(alpha) * total / expected_n
    with np.errstate(over="ignore", invalid="ignore"):
        log_lr = -0.5 * df * np.log1p(r) + r / (1.0 + r) * stat / 2.0
    return np.where(enough, np.minimum(1.0, np.exp(-np.nan_to_num(log_lr, posinf=np.inf))), 1.0)


def srm_p_value(observed: dict[str, int], weights: dict[str, int]) -> float | None:
    """Fixed-sample chi-square p-value of per-role counts against the weights; None while too few to judge."""
    check = srm_check(observed, weights, expected_n=1.0, alpha=0.5)
    return None if check is None else check["p"]


def srm_check(
    observed: dict[str, int], weights: dict[str, int], expected_n: float, alpha: float
) -> dict | None:
    """Chi-square statistic, its fixed p and its always-valid p for per-role counts; None while too few to judge."""
    roles = sorted(set(observed) | {r for r, w in weights.items() if w > 0})
    obs = np.array([[observed.get(r, 0) for r in roles]], dtype=float)
    w = np.array([max(weights.get(r, 0), 0) for r in roles], dtype=float)
    if w.sum() <= 0:
        return None
    stat, df, _, enough = chi_square(obs, w)
    if not enough[0]:
        return None
    return {
        "chi_square": float(stat[0]),
        "df": int(df[0]),
        "p": float(srm_p_values(obs, w)[0]),
        "p_always_valid": float(always_valid_srm_p(obs, w, expected_n, alpha)[0]),
    }
