"""`recsys simulate`: replay both policies on synthetic streams with known truth, many times over.

Every replication is a rollout. Requests arrive per 5 s bucket (Poisson, at a rate that may swing over
the hour), split by the step's weights; a bucket counts once it is whole, as in the aggregates
(analysis/aggregates.py); a prediction counts as labelled once its attribution window has closed, and its
outcome is positive only if its positive label was reported within the window (label delays per class,
partial coverage). Accuracy may drift for both arms, and a canary's gain may decay (novelty). Every
minute the policy's own rules decide (`policy.evaluate`, vectorised over replications) on the same
evidence the worker builds: per-step accuracy summaries combined by `strata.combine`, the sample-ratio
check pooled over steps by `srm.stratified_p_values`; between minutes the harm tests (`policy.harm`) run
on their own faster cadence, as the worker's harm job does. So what is measured here is what runs in
production; `--through-aggregates` replays a few rollouts row by row through the aggregates and the
worker's observation builder as a check of the shortcut.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import special, stats

from control_plane.analysis import guardrails, srm, strata
from control_plane.analysis.policy import (
    ADVANCE,
    HALT,
    INCONCLUSIVE,
    PROMOTE,
    ROLLBACK,
    Cause,
    Evidence,
    Policy,
    evaluate,
    harm,
)

Q = 0.99  # the latency quantile the guardrail is about
HOUR = 3600.0


@dataclass(frozen=True)
class Scenario:
    """The truth of one stream: how the canary differs from the baseline, and how the world behaves."""

    name: str
    lift: float = 0.0  # canary minus baseline accuracy (at the start, if it decays)
    error_diff: float = 0.0  # canary minus baseline error rate
    latency_ratio: float = 1.0  # canary latencies are this times the baseline's (so is its p99)
    srm_loss: float = 0.0  # share of canary requests missing from the log (a sample-ratio mismatch)
    novelty_tau_s: float | None = None  # the lift decays as exp(-t / tau) to 0 (novelty); None: constant
    drift_per_h: float = 0.0  # both arms' accuracy changes by this much an hour (a common trend)
    rate_per_s: float | None = None  # mean request rate; None: the traffic's
    rate_swing: float = 0.0  # the rate swings by this share of its mean over `Traffic.rate_period_s`
    base_accuracy: float | None = None  # the baseline's true accuracy; None: the planning value
    label_coverage: float = 1.0  # share of positive outcomes ever reported (the rest read as negative)
    positive_delay_median_s: float | None = None  # positives' label delays, log-normal; None: all in time

    def better(self, policy: Policy) -> bool:
        """The truth is better by the margin at the end, with both guardrails intact (promotion is right)."""
        return (
            self.lift > policy.accuracy_margin
            and self.novelty_tau_s is None
            and self.error_diff <= policy.error_margin
            and self.latency_ratio <= policy.p99_ratio
        )

    def lift_at(self, t: np.ndarray | float) -> np.ndarray:
        if self.novelty_tau_s is None:
            return np.full_like(np.asarray(t, dtype=float), self.lift)
        return self.lift * np.exp(-np.asarray(t, dtype=float) / self.novelty_tau_s)


@dataclass(frozen=True)
class Traffic:
    """The stream's shape, shared by every scenario (a scenario may override some of it)."""

    rate_per_s: float = 20.0
    eval_interval_s: float = 60.0  # the scheduled evaluation: every minute
    harm_interval_s: float = 15.0  # the harm checks' own cadence (settings.harm_interval_s)
    bucket_s: float = 5.0  # the aggregates' bucket: a bucket's requests count once it is whole
    label_window_s: float = 300.0  # attribution window: a prediction is labelled once it has closed
    base_accuracy: float = 0.78
    click_rate: float = 0.3  # share of predictions whose true outcome is positive
    positive_delay_sigma: float = 1.0  # log-normal spread of positive labels' delays
    base_error_rate: float = 0.005
    latency_median_ms: float = 20.0
    latency_sigma: float = 0.4  # log-normal: p99 is about 2.5 x the median
    control_weight: int = 5
    rate_period_s: float = HOUR  # a swinging rate completes one cycle in this time

    @property
    def label_delay_s(self) -> float:  # the name replay.py knows the window by
        return self.label_window_s


SCENARIOS = (
    # not better than the margin: promoting is false
    Scenario("A/A"),
    Scenario("accuracy +0.5 pt", lift=0.005),
    Scenario("accuracy +0.8 pt (below margin)", lift=0.008),
    Scenario("accuracy +1 pt (at margin)", lift=0.01),
    Scenario("+0.8 pt, both arms +2 pts/h (drift)", lift=0.008, drift_per_h=0.02),
    Scenario("+0.8 pt, both arms -2 pts/h (drift)", lift=0.008, drift_per_h=-0.02),
    Scenario("+0.8 pt, class-dependent label delays", lift=0.008, positive_delay_median_s=150.0),
    Scenario("+0.8 pt, 50 % of labels reported", lift=0.008, label_coverage=0.5),
    Scenario("+0.8 pt, traffic ±50 %", lift=0.008, rate_swing=0.5),
    Scenario("A/A at 2 req/s", rate_per_s=2.0),
    Scenario("A/A, baseline 70 % (planned 78 %)", base_accuracy=0.70),
    Scenario("A/A, 2 % of canary requests lost", srm_loss=0.02),
    Scenario("accuracy -1 pt", lift=-0.01),
    Scenario("accuracy -2 pts", lift=-0.02),
    # novelty: a gain that decays to nothing
    Scenario("novelty +3 pts decaying (45 min)", lift=0.03, novelty_tau_s=45 * 60.0),
    # better: promoting is right (power)
    Scenario("accuracy +1.5 pts", lift=0.015),
    Scenario("accuracy +2 pts", lift=0.02),
    Scenario("accuracy +3 pts", lift=0.03),
    Scenario("accuracy +4 pts", lift=0.04),
    Scenario("+2 pts, both arms +2 pts/h (drift)", lift=0.02, drift_per_h=0.02),
    Scenario("+2 pts, traffic ±50 %", lift=0.02, rate_swing=0.5),
    Scenario("+2 pts, class-dependent label delays", lift=0.02, positive_delay_median_s=150.0),
    Scenario("+2 pts, baseline 70 %", lift=0.02, base_accuracy=0.70),
    Scenario("+2 pts at 2 req/s", lift=0.02, rate_per_s=2.0),
    # guardrails
    Scenario("+3 pts but errors +1 pt", lift=0.03, error_diff=0.01),
    Scenario("+3 pts but p99 x1.10", lift=0.03, latency_ratio=1.10),
    Scenario("errors +0.5 pt (at margin)", error_diff=0.005),
    Scenario("errors +5 pts", error_diff=0.05),
    Scenario("errors +5 pts, traffic ±50 %", error_diff=0.05, rate_swing=0.5),
    Scenario("errors +5 pts at 2 req/s", error_diff=0.05, rate_per_s=2.0),
    Scenario("p99 x1.30", latency_ratio=1.30),
    Scenario("SRM: +2 pts, 2 % of canary requests lost", lift=0.02, srm_loss=0.02),
    Scenario("SRM: A/A, 5 % of canary requests lost", srm_loss=0.05),
)
# the threshold rule (the seed's) is replayed on these only, for comparison
THRESHOLD_SCENARIOS = ("A/A", "accuracy +0.8 pt (below margin)", "accuracy +2 pts", "errors +5 pts")


@dataclass(frozen=True)
class Outcome:
    """Per replication: final action code, its cause, when (s) and at which evaluation."""

    action: np.ndarray
    cause: np.ndarray
    time_s: np.ndarray
    evals: np.ndarray
    # per replication: when a promotion was last held back by the last-step (novelty) check, else NaN
    novelty_held_s: np.ndarray = field(default_factory=lambda: np.zeros(0))


class _TailGrid:
    """Latencies above the baseline's 97th percentile, binned finely in log space (below: only counted)."""

    def __init__(self, traffic: Traffic, bins: int = 256, width: float = 0.004):
        self.mu, self.sigma = np.log(traffic.latency_median_ms), traffic.latency_sigma
        self.lo, self.bins, self.width = self.mu + self.sigma * special.ndtri(0.97), bins, width

    def sample(self, rng: np.random.Generator, n: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        """New latencies of n requests per replication: (count below the grid, counts per bin + overflow)."""
        a = special.ndtr((self.lo - self.mu - np.log(ratio)) / self.sigma)
        tail = rng.binomial(n, 1.0 - a)
        u = rng.uniform(a, 1.0, int(tail.sum()))
        x = self.mu + np.log(ratio) + self.sigma * special.ndtri(u)
        idx = np.clip(((x - self.lo) / self.width).astype(np.int64), 0, self.bins)
        rows = np.repeat(np.arange(len(n)), tail)
        counts = np.bincount(rows * (self.bins + 1) + idx, minlength=len(n) * (self.bins + 1))
        return n - tail, counts.reshape(len(n), self.bins + 1)

    def order_stat(self, under: np.ndarray, cum: np.ndarray, k: np.ndarray, upper: bool) -> np.ndarray:
        """The k-th smallest latency (1-based) per replication, from the tail's cumulative bin counts;
        conservative outside the grid."""
        n = under + cum[:, -1]
        j = np.clip(k - under, 1, None)
        idx = np.minimum((cum < j[:, None]).sum(axis=1), self.bins)
        value = np.exp(self.lo + (idx + 0.5) * self.width)
        value = np.where(idx >= self.bins, np.inf, value)  # overflow: beyond the grid
        below = np.exp(self.lo) if upper else 0.0  # inside the uncounted bulk: only "below the grid" is known
        value = np.where(k <= under, below, value)
        return np.where(k < 1, 0.0, np.where(k > n, np.inf, value))

    def p99(self, under: np.ndarray, cum: np.ndarray) -> np.ndarray:
        """Point estimate of the p99 (the ceil(0.99 n)-th smallest)."""
        n = under + cum[:, -1]
        return self.order_stat(under, cum, np.maximum(np.ceil(n * Q), 1), upper=True)

    def bounds(
        self, under: np.ndarray, cum: np.ndarray, alpha: float, expected_n: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Always-valid lower and upper bound of the p99, each one-sided at alpha."""
        n = under + cum[:, -1]
        lo_k, hi_k = guardrails.quantile_ranks(n, Q, alpha, expected_n)
        return self.order_stat(under, cum, lo_k, upper=False), self.order_stat(under, cum, hi_k, upper=True)


def _rate(scenario: Scenario, traffic: Traffic, t: float, phase: np.ndarray) -> np.ndarray:
    """Requests per second at time t, per replication (each starts at its own point of the cycle)."""
    mean = traffic.rate_per_s if scenario.rate_per_s is None else scenario.rate_per_s
    return mean * (1.0 + scenario.rate_swing * np.sin(2 * np.pi * t / traffic.rate_period_s + phase))


def _reported(scenario: Scenario, traffic: Traffic) -> float:
    """The chance that a positive outcome is reported within the attribution window."""
    if scenario.positive_delay_median_s is None:
        return scenario.label_coverage
    z = np.log(traffic.label_window_s / scenario.positive_delay_median_s) / traffic.positive_delay_sigma
    return scenario.label_coverage * float(special.ndtr(z))


def _labelled_minute(rng, served: np.ndarray, accuracy: np.ndarray, traffic: Traffic, q: float):
    """(labelled, correct as the label job counts it) for one minute of served predictions.

    A true positive whose label is not reported in time reads as a negative: right if the model said no.
    """
    pos = rng.binomial(served, traffic.click_rate)
    right_pos = rng.binomial(pos, accuracy)
    right_neg = rng.binomial(served - pos, accuracy)
    seen_right = rng.binomial(right_pos, q)
    seen_wrong = rng.binomial(pos - right_pos, q)
    return served, right_neg + seen_right + (pos - right_pos - seen_wrong)


@dataclass
class _World:
    """Running sums of one scenario's replications (arms: "c" canary, "b" baseline)."""

    reps: int
    periods: int
    bins: int
    visible_n: dict = field(default_factory=dict)  # requests in whole buckets, per arm
    visible_e: dict = field(default_factory=dict)
    lat_under: dict = field(default_factory=dict)
    lat_bins: dict = field(default_factory=dict)
    lab_n: dict = field(default_factory=dict)  # per period (reps, periods): labelled predictions
    lab_k: dict = field(default_factory=dict)  # per period: of those, correct
    roles: np.ndarray = (
        None  # (reps, periods, 3): logged requests per period and role (baseline, canary, control)
    )
    assigned: np.ndarray = None  # (reps, 3): requests per role as the router counted them

    def __post_init__(self):
        for a in "cb":
            self.visible_n[a] = np.zeros(self.reps)
            self.visible_e[a] = np.zeros(self.reps)
            self.lat_under[a] = np.zeros(self.reps, np.int64)
            self.lat_bins[a] = np.zeros((self.reps, self.bins + 1), np.int64)
            self.lab_n[a] = np.zeros((self.reps, self.periods))
            self.lab_k[a] = np.zeros((self.reps, self.periods))
        self.roles = np.zeros((self.reps, self.periods, 3))
        self.assigned = np.zeros((self.reps, 3))


def run_scenario(scenario: Scenario, policy: Policy, traffic: Traffic, reps: int, seed: int) -> Outcome:
    """Replay one policy on `reps` independent streams of one scenario until every rollout has ended."""
    rng = np.random.default_rng(seed)
    grid = _TailGrid(traffic)
    dt, bucket = traffic.eval_interval_s, traffic.bucket_s
    per_eval = int(round(dt / bucket))
    harm_every = max(1, int(round(traffic.harm_interval_s / bucket)))
    steps = np.array(policy.steps)
    horizon = int(np.ceil(policy.max_duration_s / dt)) + 1
    lag = int(np.ceil(traffic.label_window_s / dt))  # minutes before a minute's predictions are labelled
    base = traffic.base_accuracy if scenario.base_accuracy is None else scenario.base_accuracy
    err = {"c": traffic.base_error_rate + scenario.error_diff, "b": traffic.base_error_rate}
    ratio = {"c": scenario.latency_ratio, "b": 1.0}
    q = _reported(scenario, traffic)
    phase = rng.uniform(0, 2 * np.pi, reps)
    w = _World(reps, len(steps), grid.bins)
    # per minute, per arm: served predictions and correct ones, waiting for their window to close
    served_hist = {a: np.zeros((horizon + 1, reps)) for a in "cb"}
    correct_hist = {a: np.zeros((horizon + 1, reps)) for a in "cb"}
    step_hist = np.zeros((horizon + 1, reps), np.int64)
    win = int(np.ceil(policy.window_s / dt))
    windowed = policy.name == "threshold"
    cum = {(a, m): np.zeros((horizon + 1, reps)) for a in "cb" for m in "nesk"} if windowed else {}
    ring = {a: np.zeros((win + 1, reps, grid.bins + 2), np.int32) for a in "cb"} if windowed else {}
    step_idx = np.zeros(reps, np.int64)
    step_start = np.zeros(reps)
    running = np.ones(reps)
    lat_lower = np.zeros(reps)
    active = np.ones(reps, bool)
    out_action, out_cause = np.full(reps, -1), np.full(reps, -1)
    out_time, out_evals = np.full(reps, np.nan), np.zeros(reps, np.int64)
    novelty_held = np.full(reps, np.nan)
    pending = {a: np.zeros(reps) for a in "cb"}  # the newest bucket: not whole until the next one starts
    pending_e = {a: np.zeros(reps) for a in "cb"}
    orig = np.arange(reps)  # the replications still simulated, by their index in the outcome
    for t in range(1, horizon + 1):
        w_c = steps[step_idx]
        weights = np.stack(
            [100 - w_c - traffic.control_weight, w_c, np.full(reps, traffic.control_weight)], 1
        )
        minute_n = {a: np.zeros(reps) for a in "cb"}
        minute_e = {a: np.zeros(reps) for a in "cb"}
        for j in range(per_eval):
            now = (t - 1) * dt + (j + 1) * bucket
            lam = _rate(scenario, traffic, now - bucket / 2, phase) * bucket / 100.0
            # the bucket that ended at now-bucket is whole: it counts from now on
            for a in "cb":
                w.visible_n[a] += pending[a]
                w.visible_e[a] += pending_e[a]
            for i, a in ((1, "c"), (0, "b")):
                n = rng.poisson(lam * weights[:, i])
                w.assigned[:, i] += n  # the router's own count, before anything is lost
                if a == "c" and scenario.srm_loss:
                    n = rng.binomial(n, 1.0 - scenario.srm_loss)
                e = rng.binomial(n, err[a])
                pending[a], pending_e[a] = n.astype(float), e.astype(float)
                minute_n[a] += n
                minute_e[a] += e
                w.roles[np.arange(reps), step_idx, i] += n
            n_k = rng.poisson(lam * traffic.control_weight)
            w.assigned[:, 2] += n_k
            w.roles[np.arange(reps), step_idx, 2] += n_k
            if j == per_eval - 1 or (j + 1) % harm_every:
                continue
            # the harm job, between evaluations: requests and errors of whole buckets, last minute's p99 bound
            ev = _harm_evidence(w, lat_lower)
            h = harm(policy, ev) if policy.name == "sequential" else None
            if h is not None:
                hit = active & (h["err_harm"] | h["lat_harm"])
                o = orig[hit]
                out_action[o], out_time[o], out_evals[o] = ROLLBACK, now, t - 1
                out_cause[o] = np.where(h["err_harm"][hit], int(Cause.ERRORS), int(Cause.LATENCY))
                active &= ~hit
        now = t * dt
        t_mid = now - dt / 2
        acc_b = np.clip(base + scenario.drift_per_h * t_mid / HOUR, 0.0, 1.0)
        acc_c = np.clip(acc_b + float(scenario.lift_at(t_mid)), 0.0, 1.0)
        acc = {"b": np.full(reps, acc_b), "c": np.full(reps, acc_c)}
        for a in "cb":
            served = minute_n[a] - minute_e[a]
            lab, corr = _labelled_minute(rng, served.astype(np.int64), acc[a], traffic, q)
            served_hist[a][t], correct_hist[a][t] = lab, corr
            under, counts = grid.sample(rng, minute_n[a].astype(np.int64), ratio[a])
            w.lat_under[a] += under
            w.lat_bins[a] += counts
            if windowed:
                for m, v in (("n", minute_n[a]), ("e", minute_e[a]), ("s", lab), ("k", corr)):
                    cum[a, m][t] = cum[a, m][t - 1] + v
                ring[a][t % (win + 1), :, 0] = w.lat_under[a]
                ring[a][t % (win + 1), :, 1:] = w.lat_bins[a]
        step_hist[t] = step_idx
        closed = t - lag  # this minute's predictions have just had their window close
        if closed >= 1:
            for a in "cb":
                w.lab_n[a][np.arange(reps), step_hist[closed]] += served_hist[a][closed]
                w.lab_k[a][np.arange(reps), step_hist[closed]] += correct_hist[a][closed]
        ev = _evidence(policy, grid, w, cum, ring, t, lag, win) if windowed else _evidence(policy, grid, w)
        all_weights = np.broadcast_to(
            np.stack(
                [100 - steps - traffic.control_weight, steps, np.full(len(steps), traffic.control_weight)], 1
            ),
            w.roles.shape,
        )
        fixed, valid = srm.stratified_p_values(w.roles, all_weights, policy.srm_expected_n, policy.srm_p)
        ev = replace(
            ev,
            srm_p=valid,
            srm_p_fixed=fixed,
            loss_p=srm.loss_p_values(w.assigned, w.roles.sum(axis=1), policy.srm_p),
            elapsed_s=np.full(reps, now),
            step_elapsed_s=now - step_start,
            step_index=step_idx.astype(float),
            running_p=running,
        )
        action, cause, st = evaluate(policy, ev)
        lat_lower = ev.p99_ratio_lower
        held = active & (cause == Cause.NOVELTY)
        novelty_held[orig[held]] = now
        done = active & np.isin(action, (PROMOTE, ROLLBACK, HALT, INCONCLUSIVE))
        o = orig[done]
        out_action[o], out_cause[o], out_time[o], out_evals[o] = action[done], cause[done], now, t
        adv = active & (action == ADVANCE)
        step_idx = np.where(adv, np.minimum(step_idx + 1, len(steps) - 1), step_idx)
        step_start = np.where(adv, now, step_start)
        if "p_superior" in st:
            running = np.where(active, np.minimum(running, st["p_superior"]), running)
        active &= ~done
        if not active.any():
            break
        if active.sum() < 0.6 * len(active):  # simulate only the rollouts still running
            k = np.flatnonzero(active)
            orig, phase, step_idx, step_start = orig[k], phase[k], step_idx[k], step_start[k]
            running, lat_lower, active = running[k], lat_lower[k], active[k]
            step_hist = step_hist[:, k]
            w.roles, w.assigned, w.reps = w.roles[k], w.assigned[k], len(k)
            for a in "cb":
                pending[a], pending_e[a] = pending[a][k], pending_e[a][k]
                served_hist[a], correct_hist[a] = served_hist[a][:, k], correct_hist[a][:, k]
                for d in (w.visible_n, w.visible_e, w.lat_under, w.lat_bins, w.lab_n, w.lab_k):
                    d[a] = d[a][k]
                if windowed:
                    ring[a] = ring[a][:, k]
                    for m in "nesk":
                        cum[a, m] = cum[a, m][:, k]
            reps = len(k)
    return Outcome(out_action, out_cause, out_time, out_evals, novelty_held)


def _harm_evidence(w: _World, lat_lower: np.ndarray) -> Evidence:
    """What the harm job reads between evaluations: whole buckets' requests and errors."""
    zeros = np.zeros(w.reps)
    n_lat = {a: (w.lat_under[a] + w.lat_bins[a].sum(axis=1)).astype(float) for a in "cb"}
    return Evidence(
        requests_c=w.visible_n["c"],
        errors_c=w.visible_e["c"],
        requests_b=w.visible_n["b"],
        errors_b=w.visible_e["b"],
        labelled_c=zeros,
        correct_c=zeros,
        labelled_b=zeros,
        correct_b=zeros,
        latencies_c=n_lat["c"],
        latencies_b=n_lat["b"],
        p99_ratio=zeros + 1.0,
        p99_ratio_lower=lat_lower,
        p99_ratio_upper=zeros + np.inf,
        srm_p=zeros + 1.0,
        srm_p_fixed=zeros + 1.0,
        elapsed_s=zeros,
        step_elapsed_s=zeros,
        step_index=zeros,
        running_p=zeros + 1.0,
    )


def _evidence(
    policy: Policy,
    grid: _TailGrid,
    w: _World,
    cum: dict | None = None,
    ring: dict | None = None,
    t: int = 0,
    lag: int = 0,
    win: int = 0,
) -> Evidence:
    """The rule's inputs at minute t: all data since the start, per step (sequential), or the rolling
    window's pooled counts (threshold)."""
    if ring:
        start = max(t - win, 0)
        lab_t = max(t - lag, 0)

        def since(a: str, m: str, until: int) -> np.ndarray:
            return cum[a, m][until] - cum[a, m][min(start, until)]

        lat = {}
        for a in "cb":
            old = ring[a][start % (win + 1)] if t > win else np.zeros_like(ring[a][0])
            lat[a] = (w.lat_under[a] - old[:, 0], np.cumsum(w.lat_bins[a] - old[:, 1:], axis=1))
        counts = {
            a: (since(a, "n", t), since(a, "e", t), since(a, "s", lab_t), since(a, "k", lab_t)) for a in "cb"
        }
        periods = {}
    else:
        lat = {a: (w.lat_under[a], np.cumsum(w.lat_bins[a], axis=1)) for a in "cb"}
        counts = {
            a: (w.visible_n[a], w.visible_e[a], w.lab_n[a].sum(axis=1), w.lab_k[a].sum(axis=1)) for a in "cb"
        }
        periods = {a: strata.proportion_periods(w.lab_k[a], w.lab_n[a]) for a in "cb"}
    p99 = {a: grid.p99(*lat[a]) for a in "cb"}
    n_lat = {a: (lat[a][0] + lat[a][1][:, -1]).astype(float) for a in "cb"}
    if policy.name == "sequential":
        a, ha = policy.alpha / 2, policy.harm_alpha / 2
        lo_c, _ = grid.bounds(*lat["c"], ha, policy.harm_expected_n)
        _, hi_b = grid.bounds(*lat["b"], ha, policy.harm_expected_n)
        _, hi_c = grid.bounds(*lat["c"], a, policy.planned_n)
        lo_b, _ = grid.bounds(*lat["b"], a, policy.planned_n)
        lower, _ = guardrails.ratio_bounds(lo_c, 0.0, 1.0, hi_b)
        _, upper = guardrails.ratio_bounds(0.0, hi_c, lo_b, 1.0)
    else:
        lower, upper = np.zeros_like(p99["c"]), np.full_like(p99["c"], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(p99["b"] > 0, p99["c"] / p99["b"], np.inf)
    zeros = np.zeros_like(point)
    return Evidence(
        requests_c=counts["c"][0],
        errors_c=counts["c"][1],
        requests_b=counts["b"][0],
        errors_b=counts["b"][1],
        labelled_c=counts["c"][2],
        correct_c=counts["c"][3],
        labelled_b=counts["b"][2],
        correct_b=counts["b"][3],
        latencies_c=n_lat["c"],
        latencies_b=n_lat["b"],
        p99_ratio=point,
        p99_ratio_lower=np.asarray(lower, dtype=float),
        p99_ratio_upper=np.asarray(upper, dtype=float),
        srm_p=zeros + 1.0,
        srm_p_fixed=zeros + 1.0,
        elapsed_s=zeros,
        step_elapsed_s=zeros,
        step_index=zeros,
        running_p=zeros + 1.0,
        periods_c=periods.get("c"),
        periods_b=periods.get("b"),
    )


def false_rollback(scenario: Scenario, policy: Policy, out: Outcome) -> np.ndarray:
    """Per replication: stopped for a reason the truth does not support."""
    rb, c = out.action == ROLLBACK, out.cause
    lift_end = float(scenario.lift_at(policy.max_duration_s))
    wrong = (
        ((c == Cause.ERRORS) & (scenario.error_diff <= policy.error_margin))
        | ((c == Cause.LATENCY) & (scenario.latency_ratio <= policy.p99_ratio))
        | ((c == Cause.ACCURACY_WORSE) & (lift_end >= 0))
        | ((c == Cause.FUTILITY) & (lift_end > policy.accuracy_margin))
    )
    halted_wrongly = (out.action == HALT) & (scenario.srm_loss == 0)
    return (rb & wrong) | halted_wrongly


def interval(hits: np.ndarray) -> tuple[float, float, float]:
    """Share of True and its exact (Clopper-Pearson) 95 % interval."""
    n, k = len(hits), int(np.sum(hits))
    lo = 0.0 if k == 0 else float(stats.beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(0.975, k + 1, n - k))
    return k / n, lo, hi


def summarize(scenario: Scenario, policy: Policy, out: Outcome, traffic: Traffic | None = None) -> dict:
    """The table row of one scenario under one policy: each rate with its 95 % interval."""
    traffic = traffic or Traffic()
    promoted = out.action == PROMOTE
    decided = out.time_s[(out.action >= 0) & (out.action != INCONCLUSIVE)] / 60.0
    null = not scenario.better(policy) and scenario.novelty_tau_s is None
    # within two evaluations: by the second scheduled evaluation (harm checks may come in between)
    in_two = (out.action == ROLLBACK) & (out.time_s <= 2 * traffic.eval_interval_s + 1e-9)
    row = {
        "scenario": scenario.name,
        "kind": _kind(scenario, policy),
        "reps": len(out.action),
        "promoted": interval(promoted),
        "rolled_back": interval(out.action == ROLLBACK),
        "halted": interval(out.action == HALT),
        "inconclusive": interval(out.action == INCONCLUSIVE),
        "false_promotion": interval(promoted) if null else None,
        "power": interval(promoted) if scenario.better(policy) and not scenario.srm_loss else None,
        "false_rollback": interval(false_rollback(scenario, policy, out)),
        "rollback_within_2": interval(in_two),
        "halted_before_verdict": interval(out.action == HALT) if scenario.srm_loss else None,
        "median_min": float(np.median(decided)) if len(decided) else None,
        "p90_min": float(np.percentile(decided, 90)) if len(decided) else None,
        "median_promote_min": float(np.median(out.time_s[promoted] / 60.0)) if promoted.any() else None,
    }
    return row


def _kind(scenario: Scenario, policy: Policy) -> str:
    if scenario.srm_loss:
        return "sample loss"
    if scenario.novelty_tau_s is not None:
        return "novelty"
    if scenario.error_diff or scenario.latency_ratio != 1.0:
        return "guardrail"
    return "better" if scenario.better(policy) else "not better"


def _ci(x: tuple[float, float, float] | None) -> str:
    if x is None:
        return "—"
    p, lo, hi = x
    return f"{100 * p:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _pct(x: tuple[float, float, float] | None) -> str:
    return "—" if x is None else f"{100 * x[0]:.1f} %"


def _min(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def table(policy: Policy, rows: list[dict]) -> str:
    """One policy's results as a markdown table (rates with 95 % intervals)."""
    head = (
        "| scenario | kind | promoted | false promotion [95 % CI] | rolled back | rolled back within 2 evals "
        "[95 % CI] | halted | inconclusive | false rollback [95 % CI] | median min | p90 min |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    body = "".join(
        f"| {r['scenario']} | {r['kind']} | {_pct(r['promoted'])} | {_ci(r['false_promotion'])} "
        f"| {_pct(r['rolled_back'])} | {_ci(r['rollback_within_2']) if r['kind'] == 'guardrail' else '—'} "
        f"| {_pct(r['halted'])} | {_pct(r['inconclusive'])} | {_ci(r['false_rollback'])} "
        f"| {_min(r['median_min'])} | {_min(r['p90_min'])} |\n"
        for r in rows
    )
    return f"### policy: {policy.name}\n\n{head}{body}"


def targets(policy: Policy, rows: list[dict]) -> tuple[str, bool]:
    """The issue's targets checked against the sequential policy's rows: (markdown list, all met)."""
    by = {r["scenario"]: r for r in rows}
    checks: list[tuple[str, bool]] = []
    nulls = [
        r for r in rows if r["false_promotion"] is not None and r["kind"] in ("not better", "sample loss")
    ]
    worst = max(nulls, key=lambda r: r["false_promotion"][0])
    worst_hi = max(nulls, key=lambda r: r["false_promotion"][2])
    checks.append(
        (
            f"false promotions ≤ 5 % (upper 95 % end ≤ 6.5 %) in every scenario not better than the margin: "
            f"worst {_ci(worst['false_promotion'])} ({worst['scenario']}); highest upper end "
            f"{100 * worst_hi['false_promotion'][2]:.1f} % ({worst_hi['scenario']})",
            worst["false_promotion"][0] <= 0.05 and worst_hi["false_promotion"][2] <= 0.065,
        )
    )
    for r in rows:
        if r["kind"] == "novelty":
            checks.append(
                (f"{r['scenario']}: promoted {_ci(r['promoted'])} (≤ 10 %)", r["promoted"][0] <= 0.10)
            )
    if "accuracy +2 pts" in by:
        r = by["accuracy +2 pts"]
        checks.append(
            (
                f"power at +2 pts, 20 req/s, within 6 h: {_ci(r['power'])} (≥ 90 %), median time to promote "
                f"{_min(r['median_promote_min'])} min",
                r["power"][0] >= 0.90,
            )
        )
    for name in ("errors +5 pts", "errors +5 pts, traffic ±50 %"):
        if name in by:
            r = by[name]
            checks.append(
                (
                    f"{name}: rolled back within two evaluations {_ci(r['rollback_within_2'])} (≥ 95 %)",
                    r["rollback_within_2"][0] >= 0.95,
                )
            )
    if "A/A" in by:
        r = by["A/A"]
        checks.append(
            (
                f"A/A (canary equal to the baseline): false rollbacks {_ci(r['false_rollback'])} (≤ 10 %)",
                r["false_rollback"][0] <= 0.10,
            )
        )
    for r in rows:
        if r["kind"] == "sample loss" and "2 %" in r["scenario"]:
            checks.append(
                (
                    f"{r['scenario']}: halted before any promotion or futility rollback "
                    f"{_ci(r['halted'])} (≥ 80 %)",
                    r["halted"][0] >= 0.80,
                )
            )
    lines = "\n".join(f"- {'✅' if ok else '❌'} {text}" for text, ok in checks)
    return lines + "\n", all(ok for _, ok in checks)


def power_curve(results: dict[str, list[tuple[Scenario, dict]]], path: Path, margin: float) -> None:
    """P(promote) against the true accuracy lift (constant lift, 20 req/s, nothing else changed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pairs in results.items():
        pts = sorted(
            (s.lift * 100, r["promoted"]) for s, r in pairs if s == replace(Scenario(s.name), lift=s.lift)
        )
        if len(pts) < 2:
            continue
        x = [p[0] for p in pts]
        y = [p[1][0] for p in pts]
        ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, [p[1][1] for p in pts], [p[1][2] for p in pts], alpha=0.2)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8, label="90 % power")
    ax.axhline(0.05, color="red", ls=":", lw=0.8, label="5 % false promotions")
    ax.axvline(margin * 100, color="black", ls=":", lw=0.8, label="margin")
    ax.set(
        xlabel="true accuracy lift (pts)", ylabel="P(promote) within 6 h", ylim=(0, 1.02), title="Power curve"
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def power_table(pairs: list[tuple[Scenario, dict]]) -> str:
    """The power curve's points as text: lift, P(promote) with its interval, median minutes to promote."""
    pts = [(s, r) for s, r in pairs if s == replace(Scenario(s.name), lift=s.lift)]
    lines = ["| true lift | P(promote) [95 % CI] | median min to promote |", "|--:|--:|--:|"]
    lines += [
        f"| {100 * s.lift:+.1f} pts | {_ci(r['promoted'])} | {_min(r['median_promote_min'])} |"
        for s, r in sorted(pts, key=lambda p: p[0].lift)
    ]
    return "\n".join(lines) + "\n"


def _one_run(
    scenario: Scenario, policy: Policy, traffic: Traffic, reps: int, seed: int
) -> tuple[dict, float]:
    """One scenario under one policy (in a worker process): its table row and the CPU seconds it took."""
    cpu = time.process_time()
    out = run_scenario(scenario, policy, traffic, reps, seed)
    return summarize(scenario, policy, out, traffic), time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    """Run every scenario under the sequential policy (and a few under the threshold rule); print and write
    the tables, the targets and the power curve."""
    p = argparse.ArgumentParser(prog="recsys simulate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--reps", type=int, default=None, help="replications per scenario (default 600, quick 150)"
    )
    p.add_argument("--out", default="sim-results", help="directory for simulation.md and power_curve.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="150 replications: a quick look, not the report")
    p.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="scenarios run in parallel (default 2)"
    )
    p.add_argument(
        "--through-aggregates",
        type=int,
        default=0,
        metavar="N",
        help="also run N replications of a few scenarios through the production path: rows, aggregates, "
        "the worker's observation builder and decide() (control_plane/replay.py)",
    )
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "--":  # `recsys simulate -- --reps 10` passes the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    reps = args.reps or (150 if args.quick else 600)
    if reps < 1:
        p.error("--reps must be positive")
    traffic, seq_policy, thr_policy = Traffic(), Policy(name="sequential"), Policy(name="threshold")
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = [(s, seq_policy, args.seed * 1000 + i) for i, s in enumerate(SCENARIOS)]
    runs += [
        (s, thr_policy, args.seed * 1000 + i)
        for i, s in enumerate(SCENARIOS)
        if s.name in THRESHOLD_SCENARIOS
    ]
    results: dict[str, list[tuple[Scenario, dict]]] = {"sequential": [], "threshold": []}
    child_cpu = 0.0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_one_run, s, pol, traffic, reps, seed) for s, pol, seed in runs]
        for (s, pol, _), future in zip(runs, futures, strict=True):
            row, cpu = future.result()
            child_cpu += cpu
            results[pol.name].append((s, row))
            print(f"  {pol.name:10s} {s.name}: {cpu:.1f} s CPU", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    cpu = child_cpu + time.process_time() - cpu_started
    seq_rows = [r for _, r in results["sequential"]]
    checks, met = targets(seq_policy, seq_rows)
    doc = (
        f"# Simulation: {reps} replications per scenario (seed {args.seed})\n\n"
        f"Traffic: {traffic}\n\nPolicy defaults: {seq_policy.to_dict()}\n\n"
        "Each rate is the share of replications, with its exact 95 % interval. False promotion: promoted "
        "although the truth is not better than the margin (scenarios of kind *not better* and *sample loss*; "
        "novelty is judged on its own). False rollback: rolled back for a cause the truth does not support, "
        "or halted without a sample loss. Rolled back within 2 evals: by the second scheduled evaluation "
        "(2 min), counting the harm checks that run every "
        f"{traffic.harm_interval_s:.0f} s in between; requests count once their 5 s bucket is whole. "
        "Times: minutes to a promote/rollback/halt decision (inconclusive runs end at the 6 h limit).\n\n"
        f"## Targets (sequential policy)\n\n{checks}\n"
        f"{table(seq_policy, seq_rows)}\n"
        f"### Power curve (sequential; constant lift, 20 req/s)\n\n{power_table(results['sequential'])}\n"
        "### The threshold rule, for comparison (unsafe under repeated looks)\n\n"
        f"{table(thr_policy, [r for _, r in results['threshold']])}\n"
        f"Run time: {elapsed:.0f} s wall clock with {args.jobs} worker processes, {cpu:.0f} s of CPU in all\n"
    )
    # Users as the unit: the heavy-user A/A scenario, request-level beside user-level (simulate_users.py).
    from control_plane.analysis.simulate_users import HeavyUsers, heavy_user_table

    doc += "\n" + heavy_user_table(seq_policy, HeavyUsers(), min(reps, 200), args.seed)
    if args.through_aggregates > 0:
        # replay.py builds on this module (Scenario, Traffic), so it is imported here, not at the top.
        from control_plane.replay import replay_table

        picked = [s for s in SCENARIOS if s.name in REPLAY_SCENARIOS]
        doc += "\n" + replay_table(picked, seq_policy, traffic, args.through_aggregates, args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulation.md").write_text(doc)
    power_curve(results, out_dir / "power_curve.png", seq_policy.accuracy_margin)
    print(doc)
    print(f"wrote {out_dir / 'simulation.md'} and {out_dir / 'power_curve.png'}")
    print("all targets met" if met else "NOT all targets met")
    return 0


REPLAY_SCENARIOS = ("A/A", "accuracy +3 pts", "errors +5 pts", "+0.8 pt, both arms +2 pts/h (drift)")
