"""The heavy-user A/A scenario: users, not requests, are assigned, and a few users make most requests.

Each user has an accuracy of its own (how well any model predicts that person's clicks) and a request
rate; 1 % of users make requests 100 times as often as the rest, so they make half of all requests.
Users are assigned as the gateway assigns them (control_plane/traffic/user_assignment.py: a fixed place
per user, the canary's share at the top, growing with each step), and both arms run the same model.
The canary's accuracy then differs from the baseline's by which users it happened to get: an arm
holding one heavy user with a high accuracy looks better by points, over tens of thousands of requests.

The same policy decides each replication twice: once with the request-level variance (each request
a unit) and once with the user-level one (analysis/user_level.py: delta method, each user in each
arm a cluster). The sample-ratio check counts users at first assignment in both, so the two differ
only in the unit of the accuracy test. Latency is the same in both arms and taken as known (this
scenario is about the accuracy test); errors are drawn per request at the same rate.

A policy deciding on a /recommend ranking metric (MRR, NDCG, CTR@k) runs the same scenario on it: each
request is an exposure, each user clicks with a probability of its own (`base_ctr`, `ctr_sd`), half of
the clicks at position 1 and half at position 3, and the metric's per-exposure values are summed per
user with their squares. The request-level test then takes the metric's per-exposure variance
(ranking.unit_variance), the user-level one the delta method over users floored at it, as decide() does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from control_plane.analysis import srm, strata
from control_plane.analysis.policy import (
    ADVANCE,
    HALT,
    INCONCLUSIVE,
    PROMOTE,
    ROLLBACK,
    Evidence,
    Policy,
    evaluate,
)
from control_plane.analysis.ranking import gain


@dataclass(frozen=True)
class HeavyUsers:
    """The population of the heavy-user scenario."""

    users: int = 1000
    heavy_share: float = 0.01  # share of users who are heavy
    heavy_factor: float = 100.0  # a heavy user's request rate over a light one's
    rate_per_s: float = 20.0  # all users together
    base_accuracy: float = 0.78
    accuracy_sd: float = 0.12  # spread of the users' own accuracies
    error_rate: float = 0.005
    label_delay_s: float = 300.0
    eval_interval_s: float = 60.0
    control_share: float = 0.05
    base_ctr: float = 0.3  # a ranking metric's scenario: the users' own click rates
    ctr_sd: float = 0.12


@dataclass(frozen=True)
class UnitOutcome:
    """Per replication, for one unit of analysis: the final action code."""

    unit: str
    action: np.ndarray

    def share(self, code: int) -> float:
        return float(np.mean(self.action == code))


def _ratio_sums(n: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per replication (rows), over users (columns) with n > 0: k, S_n, S_c, S_nn, S_cc, S_cn."""
    has = n > 0
    return has.sum(1), n.sum(1), c.sum(1), (n * n).sum(1), (c * c).sum(1), (c * n).sum(1)


def _delta_var(k, sn, sc, snn, scc, scn, unit_var=None) -> np.ndarray:
    """user_level.ratio_estimate, vectorised over replications (`unit_var` per replication: the floor's
    per-unit variance; None: r(1 - r))."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sn > 0, sc / sn, np.nan)
        resid = np.maximum(scc - 2 * r * scn + r * r * snn, 0.0)
        var = np.where(k > 1, k / np.maximum(k - 1, 1) * resid / (sn * sn), np.inf)
        return np.maximum(var, (r * (1 - r) if unit_var is None else unit_var) / sn)


def _unit_var(n: np.ndarray, y: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """ranking.unit_variance, vectorised: the per-exposure variance with pseudo-exposures at 0 and 1."""
    m = (y + 1.0) / (n + 2.0)
    return (yy + 1.0) / (n + 2.0) - m * m


def run_heavy_users(policy: Policy, pop: HeavyUsers, reps: int, seed: int) -> dict[str, UnitOutcome]:
    """Replay the policy on `reps` A/A streams; the same draws judged with each unit."""
    rng = np.random.default_rng(seed)
    u, dt = pop.users, pop.eval_interval_s
    heavy = rng.random((reps, u)) < pop.heavy_share
    weight = np.where(heavy, pop.heavy_factor, 1.0)
    rate = weight / weight.sum(1, keepdims=True) * pop.rate_per_s * dt  # requests a minute
    ranking = policy.decision_metric.ranking
    mean, sd = (pop.base_ctr, pop.ctr_sd) if ranking else (pop.base_accuracy, pop.accuracy_sd)
    acc = np.clip(rng.normal(mean, sd, (reps, u)), 0.0, 1.0)  # a user's accuracy, or click rate
    top, low = gain(policy.decision_metric, np.array([1, 3]), policy.metric_k) if ranking else (1.0, 1.0)
    place = rng.random((reps, u))  # the user's place on the gateway's hash line
    steps = np.array(policy.steps)
    horizon = int(np.ceil(policy.max_duration_s / dt)) + 1
    delay = int(np.ceil(pop.label_delay_s / dt))
    results = {}
    population = (rate, acc, place)
    for unit in ("request", "user"):
        sub = np.random.default_rng(rng.integers(1 << 62))
        rate, acc, place = population
        n_rows = reps
        step_idx, step_start = np.zeros(n_rows, np.int64), np.zeros(n_rows)
        running, active = np.ones(n_rows), np.ones(n_rows, bool)
        out = np.full(reps, -1)
        orig = np.arange(reps)  # the replications still simulated, by their index in `out`
        # per arm (0 baseline, 1 canary) and user: requests, errors, served, correct (a ranking metric:
        # its values' sum), the values' squares; labels lag `delay`
        cum = np.zeros((2, 5, n_rows, u))
        lagged = [cum[:, 2:].copy() for _ in range(delay + 1)]
        first = np.full((n_rows, u), -1)  # arm of the first request: 0 baseline, 1 canary, 2 control
        new_users = np.zeros((n_rows, 3))
        for t in range(1, horizon + 1):
            w_c = steps[step_idx][:, None] / 100.0
            arm = np.where(place < pop.control_share, 2, np.where(place >= 1.0 - w_c, 1, 0))
            n = sub.poisson(rate)
            e = sub.binomial(n, pop.error_rate)
            k = sub.binomial(n - e, acc)
            at_top = sub.binomial(k, 0.5)  # a ranking metric's clicks: half at position 1, half at 3
            value = at_top * top + (k - at_top) * low if ranking else k
            squares = at_top * top * top + (k - at_top) * low * low if ranking else k
            fresh = (first < 0) & (n > 0)
            first = np.where(fresh, arm, first)
            for a in range(3):
                new_users[:, a] += (fresh & (arm == a)).sum(1)
            for a in (0, 1):
                m = arm == a
                cum[a, 0] += n * m
                cum[a, 1] += e * m
                cum[a, 2] += (n - e) * m
                cum[a, 3] += value * m
                cum[a, 4] += squares * m
            lagged.append(cum[:, 2:].copy())
            labelled = lagged.pop(0)  # served and correct as of `delay` minutes ago
            lab_c, lab_b = labelled[1], labelled[0]
            ev = _evidence(policy, cum, lab_c, lab_b, n_rows)
            unit_c = _unit_var(*(lab_c[i].sum(1) for i in range(3))) if ranking else None
            unit_b = _unit_var(*(lab_b[i].sum(1) for i in range(3))) if ranking else None
            if ranking:  # the request-level test on the metric's own per-exposure variance
                ev = replace(ev, periods_c=_periods(lab_c, unit_c), periods_b=_periods(lab_b, unit_b))
            weights = np.stack(
                [
                    100 - steps[step_idx] - 100 * pop.control_share,
                    steps[step_idx],
                    np.full(n_rows, 100 * pop.control_share),
                ],
                axis=1,
            )
            ev = replace(
                ev,
                srm_p=srm.always_valid_srm_p(new_users, weights, policy.planned_n, policy.srm_p),
                srm_p_fixed=srm.srm_p_values(new_users, weights),
                elapsed_s=np.full(n_rows, t * dt),
                step_elapsed_s=t * dt - step_start,
                step_index=step_idx.astype(float),
                running_p=running,
                accuracy_var=_delta_var(*_ratio_sums(lab_c[0], lab_c[1]), unit_c)
                + _delta_var(*_ratio_sums(lab_b[0], lab_b[1]), unit_b)
                if unit == "user"
                else None,
                request_var=_request_var(lab_c, unit_c, lab_b, unit_b)
                if unit == "user" and ranking
                else None,
            )
            action, _, stats = evaluate(policy, ev)
            done = active & np.isin(action, (PROMOTE, ROLLBACK, HALT, INCONCLUSIVE))
            out[orig[done]] = action[done]
            adv = active & (action == ADVANCE)
            step_idx = np.where(adv, np.minimum(step_idx + 1, len(steps) - 1), step_idx)
            step_start = np.where(adv, t * dt, step_start)
            new_users[adv] = 0  # the check counts users first assigned in the current step
            running = np.where(active, stats.p_superior, running)
            active &= ~done
            if not active.any():
                break
            if active.sum() < 0.6 * n_rows:  # simulate only the rollouts still running
                k = np.flatnonzero(active)
                orig, rate, acc, place, first = orig[k], rate[k], acc[k], place[k], first[k]
                step_idx, step_start, running, active = step_idx[k], step_start[k], running[k], active[k]
                cum, new_users = cum[:, :, k], new_users[k]
                lagged = [x[:, :, k] for x in lagged]
                n_rows = len(k)
        results[unit] = UnitOutcome(unit, out)
    return results


def _request_var(lab_c, unit_c, lab_b, unit_b) -> np.ndarray:
    """The pooled ranking-metric difference's variance with exposures as the unit (inf before any)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return unit_c / lab_c[0].sum(1) + unit_b / lab_b[0].sum(1)


def _periods(lab: np.ndarray, unit_var: np.ndarray) -> strata.ArmPeriods:
    """One period of an arm's pooled ranking metric per replication, shape (reps, 1), as
    ranking.metric_periods gives it."""
    n, y = lab[0].sum(1)[:, None], lab[1].sum(1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, y / np.maximum(n, 1), np.nan)
        var = np.where(n >= strata.MIN_PERIOD_LABELS, unit_var[:, None] / np.maximum(n, 1), np.inf)
    return strata.ArmPeriods(n, mean, var)


def _evidence(policy: Policy, cum: np.ndarray, lab_c, lab_b, reps: int) -> Evidence:
    def tot(x: np.ndarray) -> np.ndarray:
        return x.sum(1).astype(float)

    ones, zeros = np.ones(reps), np.zeros(reps)
    big = np.full(reps, 1e9)  # latency: equal in both arms and taken as known
    return Evidence(
        requests_c=tot(cum[1, 0]),
        errors_c=tot(cum[1, 1]),
        requests_b=tot(cum[0, 0]),
        errors_b=tot(cum[0, 1]),
        labelled_c=tot(lab_c[0]),
        correct_c=tot(lab_c[1]),
        labelled_b=tot(lab_b[0]),
        correct_b=tot(lab_b[1]),
        latencies_c=big,
        latencies_b=big,
        p99_ratio=ones,
        p99_ratio_lower=ones,
        p99_ratio_upper=ones,
        srm_p=ones,
        srm_p_fixed=ones,
        elapsed_s=zeros,
        step_elapsed_s=zeros,
        step_index=zeros,
        running_p=ones,
    )


def heavy_user_table(policy: Policy, pop: HeavyUsers, reps: int, seed: int) -> str:
    """The scenario's result as markdown: false promotions (and the rest) per unit of analysis."""
    res = run_heavy_users(policy, pop, reps, seed)
    metric = f", {policy.metric_label}" if policy.decision_metric.ranking else ""
    head = "| unit of analysis | false promotion | rolled back | halted | inconclusive |\n|---|---|---|---|---|\n"
    body = "".join(
        f"| {o.unit} | {100 * o.share(PROMOTE):.1f}% | {100 * o.share(ROLLBACK):.1f}% "
        f"| {100 * o.share(HALT):.1f}% | {100 * o.share(INCONCLUSIVE):.1f}% |\n"
        for o in res.values()
    )
    return (
        f"### heavy-user A/A ({policy.name}{metric}, {reps} replications)\n\n{pop}\n\n{head}{body}\n"
        "Both arms run the same model; every promotion is false. Request-level: each request a unit; "
        "user-level: each user in each arm a cluster (delta method). The sample-ratio check counts users "
        "at first assignment in both.\n"
    )
