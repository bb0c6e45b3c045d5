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


def stratified_chi_square(
    observed: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The chi-square of counts in several periods of different weights, pooled into one test.

    `observed` and `weights` are (..., periods, roles): each period's counts are compared with that
    period's own weights (the split the router applied then), and the deviations O - E are summed over
    periods before they are judged, so a small steady loss adds up across a whole ramp instead of being
    judged one step at a time. The statistic is D' C^+ D with D the summed deviations and C their summed
    multinomial covariance; (statistic, degrees of freedom, total, judgeable) as `chi_square` gives.
    """
    obs = np.asarray(observed, dtype=float)
    w = np.broadcast_to(np.asarray(weights, dtype=float), obs.shape)
    share = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-12)
    n = obs.sum(axis=-1, keepdims=True)
    dev = (obs - n * share).sum(axis=-2)
    live = share > 0
    expected = (n * share).sum(axis=-2)
    cov = (
        n[..., None]
        * (share[..., :, None] * np.eye(share.shape[-1]) - share[..., :, None] * share[..., None, :])
    ).sum(axis=-3)
    stat = np.einsum("...i,...ij,...j->...", dev, np.linalg.pinv(cov, hermitian=True), dev)
    any_live = live.any(axis=-2)
    df = np.maximum(any_live.sum(axis=-1) - 1, 1)
    stray = np.any(~live & (obs > 0), axis=(-2, -1))
    stat = np.where(stray, np.inf, np.maximum(stat, 0.0))
    total = n[..., 0].sum(axis=-1)
    enough = stray | (
        np.all(np.where(any_live, expected >= MIN_EXPECTED, True), axis=-1) & (any_live.sum(axis=-1) >= 2)
    )
    return stat, df, total, enough


def stratified_p_values(
    observed: np.ndarray, weights: np.ndarray, expected_n: float, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(fixed-sample p, always-valid p) of the pooled-over-periods chi-square; 1.0 while too few to judge."""
    stat, df, total, enough = stratified_chi_square(observed, weights)
    fixed = np.where(enough, stats.chi2.sf(stat, df), 1.0)
    r = seq.mixing_ratio(alpha) * total / expected_n
    with np.errstate(over="ignore", invalid="ignore"):
        log_lr = -0.5 * df * np.log1p(r) + r / (1.0 + r) * stat / 2.0
    valid = np.where(enough, np.minimum(1.0, np.exp(-np.nan_to_num(log_lr, posinf=np.inf))), 1.0)
    return fixed, valid


def stratified_check(
    observed: list[dict[str, int]], weights: list[dict[str, int]], expected_n: float, alpha: float
) -> dict | None:
    """`srm_check` over several periods: each period's counts against the weights in force then."""
    roles = sorted({r for o in observed for r in o} | {r for w in weights for r, v in w.items() if v > 0})
    if not roles or not observed:
        return None
    obs = np.array([[o.get(r, 0) for r in roles] for o in observed], dtype=float)
    w = np.array([[max(wt.get(r, 0), 0) for r in roles] for wt in weights], dtype=float)
    if (w.sum(axis=1) <= 0).any():
        return None
    stat, df, _, enough = stratified_chi_square(obs, w)
    if not bool(enough):
        return None
    fixed, valid = stratified_p_values(obs, w, expected_n, alpha)
    return {
        "chi_square": float(stat),
        "df": int(df),
        "p": float(fixed),
        "p_always_valid": float(valid),
        "periods": len(observed),
    }


LOSS_EXPECTED_N = 200.0  # missing requests at which the log-loss test's mixture is tuned


def loss_p_values(assigned: np.ndarray, logged: np.ndarray, alpha: float) -> np.ndarray:
    """Always-valid p-values (per row of roles) that some role's requests go missing from the log more often
    than the others'.

    `assigned` is what the router counted per role (its own request counters: the assignments as it made
    them), `logged` what the prediction log holds for the same window. Each assigned request is logged with
    some chance; if that chance is the same for every role, the missing requests split across the roles in
    proportion to their assignments, whatever the weights were. The chi-square of the missing counts
    against those shares is judged with the same mixture as `always_valid_srm_p`. A canary losing 2 % of
    its requests leaves hundreds missing from one role within the hour and is caught at once, while the
    split of logged requests alone (`chi_square`) would need hours to tell a 2 % loss from chance.
    """
    a = np.atleast_2d(np.asarray(assigned, dtype=float))
    missing = np.maximum(a - np.atleast_2d(np.asarray(logged, dtype=float)), 0.0)
    return always_valid_srm_p(missing, a, LOSS_EXPECTED_N, alpha)
