"""`recsys simulate`'s core: replay both policies on synthetic streams with known truth, many times over.

Every replication is a rollout. Each minute makes its 5 s buckets' aggregate records at once, per role:
requests (Poisson, at a rate that may swing over the hour, split by the step's weights) as the router
counted them and as the log kept them, errors, served predictions and, for each bucket, those the label
job will count correct once its attribution window has closed (a positive outcome counts only if its label
was reported within the window: label delays per class, partial coverage). Accuracy may drift for both
arms, and a canary's gain may decay (novelty). The records are folded into each evaluation's window by
the worker's own fold (analysis/fold.py: whole buckets only, the log's settling, each bucket's ramp step,
the steady requests of the sample-ratio check), and every minute the policy's own rules decide
(`policy.evaluate`, vectorised over replications) on that evidence: per-step accuracy summaries combined
by `strata.combine`, the sample-ratio check pooled over steps by `srm.stratified_p_values`; between
minutes the harm tests (`policy.harm`) run on their own faster cadence, as the worker's harm job does.
tests/unit/test_simulate_fold.py checks that the worker's observation builder, reading the same records
from a metrics source, sees the same numbers. Returns typed results (`Report`, `Row`); the command line
(control_plane/simulate_cli.py) prints and writes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy import special, stats

from control_plane.analysis import fold, guardrails, srm, strata
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
from control_plane.analysis.sim_records import (
    LabelRecords,
    Pending,
    RequestRecords,
    Trace,
    Window,
    fold_labels,
    fold_requests,
)
from control_plane.analysis.simulate_users import HeavyUsers, heavy_user_table

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
    settle_s: float = 2.0  # the log's settling (settings.log_settle_s): requests count until now less this

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

    def tail(self, under: np.ndarray, bins: np.ndarray) -> _Tail:
        """Latencies counted per replication: below the grid, and per bin (+ overflow), cumulated."""
        return _Tail(under, np.cumsum(bins, axis=1))

    def order_stat(self, tail: _Tail, k: np.ndarray, upper: bool) -> np.ndarray:
        """The k-th smallest latency (1-based) per replication, from the tail's cumulative bin counts;
        conservative outside the grid."""
        under, cum, n = tail.under, tail.cum, tail.n
        j = np.clip(k - under, 1, None)
        idx = np.minimum((cum < j[:, None]).sum(axis=1), self.bins)
        value = np.exp(self.lo + (idx + 0.5) * self.width)
        value = np.where(idx >= self.bins, np.inf, value)  # overflow: beyond the grid
        below = np.exp(self.lo) if upper else 0.0  # inside the uncounted bulk: only "below the grid" is known
        value = np.where(k <= under, below, value)
        return np.where(k < 1, 0.0, np.where(k > n, np.inf, value))

    def p99(self, tail: _Tail) -> np.ndarray:
        """Point estimate of the p99 (the ceil(0.99 n)-th smallest)."""
        return self.order_stat(tail, np.maximum(np.ceil(tail.n * Q), 1), upper=True)

    def bounds(self, tail: _Tail, alpha: float, expected_n: float) -> tuple[np.ndarray, np.ndarray]:
        """Always-valid lower and upper bound of the p99, each one-sided at alpha."""
        lo_k, hi_k = guardrails.quantile_ranks(tail.n, Q, alpha, expected_n)
        return self.order_stat(tail, lo_k, upper=False), self.order_stat(tail, hi_k, upper=True)


@dataclass(frozen=True)
class _Tail:
    """One arm's latencies per replication on the grid: the count below it and the cumulative bin counts
    (`_TailGrid.tail`)."""

    under: np.ndarray
    cum: np.ndarray

    @property
    def n(self) -> np.ndarray:
        return self.under + self.cum[:, -1]


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


def _labelled(rng, served: np.ndarray, accuracy: np.ndarray, traffic: Traffic, q: float) -> np.ndarray:
    """Of each bucket's served predictions, those correct as the label job counts them once their window
    closes. A true positive whose label is not reported in time (chance 1 - q) reads as a negative: right
    if the model said no. Each prediction is so counted correct on its own with one same chance, so the
    count is one binomial draw."""
    pos = traffic.click_rate
    p = (1 - pos) * accuracy + pos * (accuracy * q + (1 - accuracy) * (1 - q))
    return rng.binomial(served, p)


def run_scenario(
    scenario: Scenario, policy: Policy, traffic: Traffic, reps: int, seed: int, trace: Trace | None = None
) -> Outcome:
    """Replay one policy on `reps` independent streams of one scenario until every rollout has ended.

    Each minute makes its 5 s buckets' aggregate records at once (requests, errors, served predictions
    and the correct ones, per role); at each evaluation the records now inside the window are folded by
    the worker's `fold` and added to the running sums (sums over disjoint buckets add up), and the rest
    wait. `trace` keeps the records and each evaluation's window (the compaction of ended rollouts is
    then left out, so rows stay the replications)."""
    rng = np.random.default_rng(seed)
    grid = _TailGrid(traffic)
    dt, bucket = traffic.eval_interval_s, traffic.bucket_s
    per_eval = int(round(dt / bucket))
    harm_every = max(1, int(round(traffic.harm_interval_s / bucket)))
    steps = np.array(policy.steps)
    horizon = int(np.ceil(policy.max_duration_s / dt)) + 1
    lag = int(np.ceil(traffic.label_window_s / dt))  # minutes before a minute's predictions are labelled
    base = traffic.base_accuracy if scenario.base_accuracy is None else scenario.base_accuracy
    err = np.array([traffic.base_error_rate, traffic.base_error_rate + scenario.error_diff])
    ratio = {"c": scenario.latency_ratio, "b": 1.0}
    q = _reported(scenario, traffic)
    phase = rng.uniform(0, 2 * np.pi, reps)
    lat_under = {a: np.zeros(reps, np.int64) for a in "cb"}
    lat_bins = {a: np.zeros((reps, grid.bins + 1), np.int64) for a in "cb"}
    win = int(np.ceil(policy.window_s / dt))
    sequential = policy.is_sequential
    windowed = not sequential
    # the rolling window's sums (threshold): per evaluation, cumulative over the folded increments
    cum = {(a, m): np.zeros((horizon + 1, reps)) for a in "cb" for m in "nesk"} if windowed else {}
    ring = {a: np.zeros((win + 1, reps, grid.bins + 2), np.int32) for a in "cb"} if windowed else {}
    all_weights = np.stack(
        [100 - steps - traffic.control_weight, steps, np.full(len(steps), traffic.control_weight)], 1
    )
    step_idx = np.zeros(reps, np.int64)
    step_start = np.zeros(reps)
    # each replication's periods of constant weights: the step's start, +inf until it begins
    period_starts = np.full((reps, len(steps)), np.inf)
    period_starts[:, 0] = 0.0
    running = np.ones(reps)
    lat_lower = np.zeros(reps)
    active = np.ones(reps, bool)
    out_action, out_cause = np.full(reps, -1), np.full(reps, -1)
    out_time, out_evals = np.full(reps, np.nan), np.zeros(reps, np.int64)
    novelty_held = np.full(reps, np.nan)
    pending_req = Pending(RequestRecords.empty(reps))  # made, not yet inside the window (the log settles)
    pending_lab = Pending(LabelRecords.empty(reps))  # made, their attribution windows not yet closed
    periods = fold.Periods(period_starts, period_starts)
    total = Window(
        *fold_requests(pending_req.empty, periods, until=0.0),
        fold_labels(pending_lab.empty, periods, until=0.0),
    )
    orig = np.arange(reps)  # the replications still simulated, by their index in the outcome
    offsets = np.arange(per_eval) * bucket
    for t in range(1, horizon + 1):
        t0 = (t - 1) * dt
        starts = t0 + offsets
        w_c = steps[step_idx]
        weights = np.stack(
            [100 - w_c - traffic.control_weight, w_c, np.full(reps, traffic.control_weight)], 1
        )
        lam = _rate(scenario, traffic, starts + bucket / 2, phase[:, None]) * bucket / 100.0
        assigned = rng.poisson(lam[:, None, :] * weights[:, :, None])  # (reps, roles, buckets)
        logged = assigned.copy()
        if scenario.srm_loss:
            logged[:, 1] = rng.binomial(assigned[:, 1], 1.0 - scenario.srm_loss)
        errors = np.zeros_like(logged)
        errors[:, :2] = rng.binomial(logged[:, :2], err[:, None])
        mid = starts + bucket / 2
        acc_b = np.clip(base + scenario.drift_per_h * mid / HOUR, 0.0, 1.0)
        acc_c = np.clip(acc_b + scenario.lift_at(mid), 0.0, 1.0)
        served = logged[:, :2] - errors[:, :2]
        correct = _labelled(rng, served, np.stack([acc_b, acc_c]), traffic, q)
        minute_req = RequestRecords(starts, logged, assigned, errors)
        minute_lab = LabelRecords(starts, served, correct)
        if trace is not None:
            trace.requests.append(minute_req)
            trace.labels.append(minute_lab)
        pending_req.minutes.append(minute_req)
        pending_lab.minutes.append(minute_lab)
        for a, i in (("b", 0), ("c", 1)):
            under, counts = grid.sample(rng, logged[:, i].sum(axis=1), ratio[a])
            lat_under[a] += under
            lat_bins[a] += counts
            if windowed:
                ring[a][t % (win + 1), :, 0] = lat_under[a]
                ring[a][t % (win + 1), :, 1:] = lat_bins[a]
        periods = fold.Periods(period_starts, period_starts)  # the sim's weights apply at once
        # the harm job, between evaluations: requests and errors of the buckets whole by then
        checks = [t0 + j * bucket for j in range(harm_every, per_eval, harm_every)] if sequential else []
        if checks:
            # the harm job's checks of this minute, judged at once (rows: check by replication): each
            # reads the window's totals, the due buckets counted as the fold counts them by then
            due = pending_req.due(checks[-1] - traffic.settle_s)

            untils = [c - traffic.settle_s for c in checks]
            n_lat = [
                np.tile((lat_under[a] + lat_bins[a].sum(axis=1)).astype(float), len(checks)) for a in "bc"
            ]
            h = harm(
                policy,
                _harm_evidence(
                    _seen(due.starts, due.logged[:, :2], total.logged.requests[:, :2], untils),
                    _seen(due.starts, due.errors[:, :2], total.logged.errors[:, :2], untils),
                    n_lat,
                    np.tile(lat_lower, len(checks)),
                ),
            )
            for i, now in enumerate(checks):
                err_harm, lat_harm = (a[i * reps : (i + 1) * reps] for a in (h.err_harm, h.lat_harm))
                hit = active & (err_harm | lat_harm)
                o = orig[hit]
                out_action[o], out_time[o], out_evals[o] = ROLLBACK, now, t - 1
                out_cause[o] = np.where(err_harm[hit], int(Cause.ERRORS), int(Cause.LATENCY))
                active &= ~hit
        now = t * dt
        until = now - traffic.settle_s
        labels_before = min(until, now - traffic.label_window_s)
        new = Window(
            *fold_requests(pending_req.due(until), periods, until=until),
            fold_labels(pending_lab.due(labels_before), periods, until=labels_before),
        )
        total = total + new
        # what was folded leaves: requests once inside the window, labels once their windows closed
        pending_req.fold_done(until)
        pending_lab.fold_done(labels_before)
        if trace is not None:
            trace.windows.append((now, total, fold.Periods(period_starts.copy(), period_starts.copy())))
        if windowed:
            for a, i in (("b", 0), ("c", 1)):
                inc = (
                    new.logged.requests[:, i],
                    new.logged.errors[:, i],
                    new.labels.labelled[:, i],
                    new.labels.correct[:, i],
                )
                for m, v in zip("nesk", inc, strict=True):
                    cum[a, m][t] = cum[a, m][t - 1] + v
            ev = _window_evidence(policy, grid, lat_under, lat_bins, cum, ring, t, lag, win)
        else:
            ev = _evidence(policy, grid, total, lat_under, lat_bins, all_weights)
        ev = replace(
            ev,
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
        nxt = np.minimum(step_idx + 1, len(steps) - 1)
        moved = adv & (nxt > step_idx)
        period_starts[moved, nxt[moved]] = now
        step_idx = np.where(adv, nxt, step_idx)
        step_start = np.where(adv, now, step_start)
        if st.p_superior is not None:
            running = np.where(active, np.minimum(running, st.p_superior), running)
        active &= ~done
        if not active.any():
            break
        if trace is None and active.sum() < 0.6 * len(active):  # simulate only the rollouts still running
            k = np.flatnonzero(active)
            orig, phase, step_idx, step_start = orig[k], phase[k], step_idx[k], step_start[k]
            running, lat_lower, active, period_starts = running[k], lat_lower[k], active[k], period_starts[k]
            pending_req.rows(k)
            pending_lab.rows(k)
            total = total.rows(k)
            for a in "cb":
                lat_under[a], lat_bins[a] = lat_under[a][k], lat_bins[a][k]
                if windowed:
                    ring[a] = ring[a][:, k]
                    for m in "nesk":
                        cum[a, m] = cum[a, m][:, k]
            reps = len(k)
    return Outcome(out_action, out_cause, out_time, out_evals, novelty_held)


def _base_evidence(requests, errors, labelled, correct, latencies, **rest) -> Evidence:
    """The rules' inputs with everything not given neutral (no latency shift, no sample-ratio signal)."""
    n = len(requests[0])
    zeros = np.zeros(n)
    neutral = dict(
        p99_ratio=zeros + 1.0,
        p99_ratio_lower=zeros,
        p99_ratio_upper=zeros + np.inf,
        srm_p=zeros + 1.0,
        srm_p_fixed=zeros + 1.0,
        elapsed_s=zeros,
        step_elapsed_s=zeros,
        step_index=zeros,
        running_p=zeros + 1.0,
    )
    return Evidence(
        requests_c=requests[1],
        errors_c=errors[1],
        requests_b=requests[0],
        errors_b=errors[0],
        labelled_c=labelled[1],
        correct_c=correct[1],
        labelled_b=labelled[0],
        correct_b=correct[0],
        latencies_c=latencies[1],
        latencies_b=latencies[0],
        **{**neutral, **rest},
    )


def _latency_counts(lat: dict) -> tuple[np.ndarray, np.ndarray]:
    """(baseline, canary) latencies counted, from each arm's tail."""
    return tuple(lat[a].n.astype(float) for a in "bc")


def _seen(starts: np.ndarray, values: np.ndarray, window: np.ndarray, untils: list[float]) -> np.ndarray:
    """The window's totals at each of several times, stacked (rows: time by replication): what is already
    folded plus the waiting buckets whole by then, as the fold counts them."""
    return np.concatenate([window + fold.totals(starts, values, since=0.0, until=u) for u in untils])


def _harm_evidence(
    requests: np.ndarray, errors: np.ndarray, latencies: list[np.ndarray], lat_lower: np.ndarray
) -> Evidence:
    """What the harm job reads between evaluations: whole buckets' requests and errors (baseline,
    canary), the latencies counted and the latency bound of the last evaluation."""
    zeros = np.zeros(len(lat_lower))
    return _base_evidence(
        [requests[:, i] for i in (0, 1)],
        [errors[:, i] for i in (0, 1)],
        (zeros, zeros),
        (zeros, zeros),
        tuple(latencies),
        p99_ratio_lower=lat_lower,
    )


def _evidence(
    policy: Policy, grid: _TailGrid, total: Window, lat_under: dict, lat_bins: dict, all_weights: np.ndarray
) -> Evidence:
    """The sequential rule's inputs: every folded sum since the start, per step, and the sample-ratio
    checks over the steps' steady requests (as decide() builds them from the worker's observations)."""
    lat = {a: grid.tail(lat_under[a], lat_bins[a]) for a in "cb"}
    roles = np.swapaxes(total.logged.period_steady, 1, 2)  # (reps, periods, roles)
    fixed, valid = srm.stratified_p_values(
        roles, np.broadcast_to(all_weights, roles.shape), policy.srm_expected_n, policy.srm_p
    )
    labels = total.labels
    return _base_evidence(
        [total.logged.requests[:, i] for i in (0, 1)],
        [total.logged.errors[:, i] for i in (0, 1)],
        [labels.labelled[:, i] for i in (0, 1)],
        [labels.correct[:, i] for i in (0, 1)],
        _latency_counts(lat),
        **_latency_fields(policy, grid, lat, policy.is_sequential),
        srm_p=valid,
        srm_p_fixed=fixed,
        loss_p=srm.loss_p_values(total.assigned, total.logged.requests, policy.srm_p),
        periods_c=strata.proportion_periods(labels.period_correct[:, 1], labels.period_labelled[:, 1]),
        periods_b=strata.proportion_periods(labels.period_correct[:, 0], labels.period_labelled[:, 0]),
    )


def _window_evidence(
    policy: Policy,
    grid: _TailGrid,
    lat_under: dict,
    lat_bins: dict,
    cum: dict,
    ring: dict,
    t: int,
    lag: int,
    win: int,
) -> Evidence:
    """The threshold rule's inputs at minute t: the rolling window's pooled sums (requests folded in the
    last `win` evaluations, labels of the predictions made in them)."""
    start = max(t - win, 0)

    def since(a: str, m: str, first: int) -> np.ndarray:
        return cum[a, m][t] - cum[a, m][min(first, t)]

    lat = {}
    for a in "cb":
        old = ring[a][start % (win + 1)] if t > win else np.zeros_like(ring[a][0])
        lat[a] = grid.tail(lat_under[a] - old[:, 0], lat_bins[a] - old[:, 1:])
    return _base_evidence(
        [since(a, "n", start) for a in "bc"],
        [since(a, "e", start) for a in "bc"],
        [since(a, "s", start + lag) for a in "bc"],
        [since(a, "k", start + lag) for a in "bc"],
        _latency_counts(lat),
        **_latency_fields(policy, grid, lat, policy.is_sequential),
    )


def _latency_fields(policy: Policy, grid: _TailGrid, lat: dict, sequential: bool) -> dict:
    """The p99 ratio's point estimate and, for the sequential policy, its always-valid bounds."""
    p99 = {a: grid.p99(lat[a]) for a in "cb"}
    if sequential:
        a, ha = policy.alpha / 2, policy.harm_alpha / 2
        lo_c, _ = grid.bounds(lat["c"], ha, policy.harm_expected_n)
        _, hi_b = grid.bounds(lat["b"], ha, policy.harm_expected_n)
        _, hi_c = grid.bounds(lat["c"], a, policy.planned_n)
        lo_b, _ = grid.bounds(lat["b"], a, policy.planned_n)
        lower, _ = guardrails.ratio_bounds(lo_c, 0.0, 1.0, hi_b)
        _, upper = guardrails.ratio_bounds(0.0, hi_c, lo_b, 1.0)
    else:
        lower, upper = np.zeros_like(p99["c"]), np.full_like(p99["c"], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.where(p99["b"] > 0, p99["c"] / p99["b"], np.inf)
    return {
        "p99_ratio": point,
        "p99_ratio_lower": np.asarray(lower, float),
        "p99_ratio_upper": np.asarray(upper, float),
    }


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


class Rate(NamedTuple):
    """A share of replications with its exact (Clopper-Pearson) 95 % interval."""

    share: float
    lo: float
    hi: float


def interval(hits: np.ndarray) -> Rate:
    """Share of True and its exact (Clopper-Pearson) 95 % interval."""
    n, k = len(hits), int(np.sum(hits))
    lo = 0.0 if k == 0 else float(stats.beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(0.975, k + 1, n - k))
    return Rate(k / n, lo, hi)


@dataclass(frozen=True)
class Row:
    """One scenario under one policy: each rate with its 95 % interval, and the times to decide."""

    scenario: str
    kind: str
    reps: int
    promoted: Rate
    rolled_back: Rate
    halted: Rate
    inconclusive: Rate
    false_promotion: Rate | None  # only where promoting is wrong
    power: Rate | None  # only where promoting is right
    false_rollback: Rate
    rollback_within_2: Rate
    halted_before_verdict: Rate | None  # only with a sample loss
    median_min: float | None
    p90_min: float | None
    median_promote_min: float | None


def summarize(scenario: Scenario, policy: Policy, out: Outcome, traffic: Traffic | None = None) -> Row:
    """The table row of one scenario under one policy: each rate with its 95 % interval."""
    traffic = traffic or Traffic()
    promoted = out.action == PROMOTE
    decided = out.time_s[(out.action >= 0) & (out.action != INCONCLUSIVE)] / 60.0
    null = not scenario.better(policy) and scenario.novelty_tau_s is None
    # within two evaluations: by the second scheduled evaluation (harm checks may come in between)
    in_two = (out.action == ROLLBACK) & (out.time_s <= 2 * traffic.eval_interval_s + 1e-9)
    return Row(
        scenario=scenario.name,
        kind=_kind(scenario, policy),
        reps=len(out.action),
        promoted=interval(promoted),
        rolled_back=interval(out.action == ROLLBACK),
        halted=interval(out.action == HALT),
        inconclusive=interval(out.action == INCONCLUSIVE),
        false_promotion=interval(promoted) if null else None,
        power=interval(promoted) if scenario.better(policy) and not scenario.srm_loss else None,
        false_rollback=interval(false_rollback(scenario, policy, out)),
        rollback_within_2=interval(in_two),
        halted_before_verdict=interval(out.action == HALT) if scenario.srm_loss else None,
        median_min=float(np.median(decided)) if len(decided) else None,
        p90_min=float(np.percentile(decided, 90)) if len(decided) else None,
        median_promote_min=float(np.median(out.time_s[promoted] / 60.0)) if promoted.any() else None,
    )


def _kind(scenario: Scenario, policy: Policy) -> str:
    if scenario.srm_loss:
        return "sample loss"
    if scenario.novelty_tau_s is not None:
        return "novelty"
    if scenario.error_diff or scenario.latency_ratio != 1.0:
        return "guardrail"
    return "better" if scenario.better(policy) else "not better"


def _ci(x: Rate | None) -> str:
    if x is None:
        return "—"
    p, lo, hi = x
    return f"{100 * p:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _pct(x: Rate | None) -> str:
    return "—" if x is None else f"{100 * x[0]:.1f} %"


def _min(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def table(policy: Policy, rows: list[Row]) -> str:
    """One policy's results as a markdown table (rates with 95 % intervals)."""
    head = (
        "| scenario | kind | promoted | false promotion [95 % CI] | rolled back | rolled back within 2 evals "
        "[95 % CI] | halted | inconclusive | false rollback [95 % CI] | median min | p90 min |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    body = "".join(
        f"| {r.scenario} | {r.kind} | {_pct(r.promoted)} | {_ci(r.false_promotion)} "
        f"| {_pct(r.rolled_back)} | {_ci(r.rollback_within_2) if r.kind == 'guardrail' else '—'} "
        f"| {_pct(r.halted)} | {_pct(r.inconclusive)} | {_ci(r.false_rollback)} "
        f"| {_min(r.median_min)} | {_min(r.p90_min)} |\n"
        for r in rows
    )
    return f"### policy: {policy.name}\n\n{head}{body}"


def targets(policy: Policy, rows: list[Row]) -> tuple[str, bool]:
    """The issue's targets checked against the sequential policy's rows: (markdown list, all met)."""
    by = {r.scenario: r for r in rows}
    checks: list[tuple[str, bool]] = []
    nulls = [r for r in rows if r.false_promotion is not None and r.kind in ("not better", "sample loss")]
    worst = max(nulls, key=lambda r: r.false_promotion.share)
    worst_hi = max(nulls, key=lambda r: r.false_promotion.hi)
    checks.append(
        (
            f"false promotions ≤ 5 % (upper 95 % end ≤ 6.5 %) in every scenario not better than the margin: "
            f"worst {_ci(worst.false_promotion)} ({worst.scenario}); highest upper end "
            f"{100 * worst_hi.false_promotion.hi:.1f} % ({worst_hi.scenario})",
            worst.false_promotion.share <= 0.05 and worst_hi.false_promotion.hi <= 0.065,
        )
    )
    for r in rows:
        if r.kind == "novelty":
            checks.append((f"{r.scenario}: promoted {_ci(r.promoted)} (≤ 10 %)", r.promoted.share <= 0.10))
    if "accuracy +2 pts" in by:
        r = by["accuracy +2 pts"]
        checks.append(
            (
                f"power at +2 pts, 20 req/s, within 6 h: {_ci(r.power)} (≥ 90 %), median time to promote "
                f"{_min(r.median_promote_min)} min",
                r.power.share >= 0.90,
            )
        )
    for name in ("errors +5 pts", "errors +5 pts, traffic ±50 %"):
        if name in by:
            r = by[name]
            checks.append(
                (
                    f"{name}: rolled back within two evaluations {_ci(r.rollback_within_2)} (≥ 95 %)",
                    r.rollback_within_2.share >= 0.95,
                )
            )
    if "A/A" in by:
        r = by["A/A"]
        checks.append(
            (
                f"A/A (canary equal to the baseline): false rollbacks {_ci(r.false_rollback)} (≤ 10 %)",
                r.false_rollback.share <= 0.10,
            )
        )
    for r in rows:
        if r.kind == "sample loss" and "2 %" in r.scenario:
            checks.append(
                (
                    f"{r.scenario}: halted before any promotion or futility rollback "
                    f"{_ci(r.halted)} (≥ 80 %)",
                    r.halted.share >= 0.80,
                )
            )
    lines = "\n".join(f"- {'✅' if ok else '❌'} {text}" for text, ok in checks)
    return lines + "\n", all(ok for _, ok in checks)


def power_points(pairs: list[tuple[Scenario, Row]]) -> list[tuple[Scenario, Row]]:
    """The rows of a constant lift with nothing else changed (20 req/s, no drift ...), by lift: the power
    curve's points."""
    pts = [(s, r) for s, r in pairs if s == replace(Scenario(s.name), lift=s.lift)]
    return sorted(pts, key=lambda p: p[0].lift)


def power_table(pairs: list[tuple[Scenario, Row]]) -> str:
    """The power curve's points as text: lift, P(promote) with its interval, median minutes to promote."""
    lines = ["| true lift | P(promote) [95 % CI] | median min to promote |", "|--:|--:|--:|"]
    lines += [
        f"| {100 * s.lift:+.1f} pts | {_ci(r.promoted)} | {_min(r.median_promote_min)} |"
        for s, r in power_points(pairs)
    ]
    return "\n".join(lines) + "\n"


def _one_run(scenario: Scenario, policy: Policy, traffic: Traffic, reps: int, seed: int) -> tuple[Row, float]:
    """One scenario under one policy (in a worker process): its table row and the CPU seconds it took."""
    cpu = time.process_time()
    out = run_scenario(scenario, policy, traffic, reps, seed)
    return summarize(scenario, policy, out, traffic), time.process_time() - cpu


def _heavy_users(policy: Policy, reps: int, seed: int) -> tuple[str, float]:
    """The heavy-user A/A table (simulate_users.py), in a worker process beside the scenarios."""
    cpu = time.process_time()
    return heavy_user_table(policy, HeavyUsers(), reps, seed), time.process_time() - cpu


@dataclass(frozen=True)
class Report:
    """A whole simulation: every row under each policy, the targets checked, and the report as markdown."""

    reps: int
    seed: int
    jobs: int
    traffic: Traffic
    policy: Policy  # the sequential policy the targets are about
    sequential: list[tuple[Scenario, Row]]
    threshold: list[tuple[Scenario, Row]]  # the seed's rule, on THRESHOLD_SCENARIOS only
    targets: str
    met: bool
    markdown: str
    elapsed_s: float
    cpu_s: float


def run_all(reps: int, seed: int, jobs: int, progress: Callable[[str], None] | None = None) -> Report:
    """Every scenario under the sequential policy (and a few under the threshold rule) and the heavy-user
    A/A, spread over `jobs` processes; seeded per scenario, so the result does not depend on `jobs`."""
    traffic, seq_policy, thr_policy = Traffic(), Policy(name="sequential"), Policy(name="threshold")
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = [(s, seq_policy, seed * 1000 + i) for i, s in enumerate(SCENARIOS)]
    runs += [
        (s, thr_policy, seed * 1000 + i) for i, s in enumerate(SCENARIOS) if s.name in THRESHOLD_SCENARIOS
    ]
    results: dict[str, list[tuple[Scenario, Row]]] = {"sequential": [], "threshold": []}
    child_cpu = 0.0
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        # the longest job first, so that it does not finish alone at the end
        users = pool.submit(_heavy_users, seq_policy, min(reps, 200), seed)
        # the same on MRR (a /recommend ranking metric), users' click rates around 0.3: MRR about 0.2
        mrr_policy = replace(seq_policy, metric="mrr", planning_accuracy=0.2)
        users_mrr = pool.submit(_heavy_users, mrr_policy, min(reps, 200), seed + 1)
        futures = [pool.submit(_one_run, s, pol, traffic, reps, run_seed) for s, pol, run_seed in runs]
        for (s, pol, _), future in zip(runs, futures, strict=True):
            row, cpu = future.result()
            child_cpu += cpu
            results[pol.name].append((s, row))
            if progress:
                progress(f"  {pol.name:10s} {s.name}: {cpu:.1f} s CPU")
        users_table, cpu = users.result()
        child_cpu += cpu
        mrr_table, cpu = users_mrr.result()
        child_cpu += cpu
    elapsed = time.perf_counter() - started
    cpu = child_cpu + time.process_time() - cpu_started
    seq_rows = [r for _, r in results["sequential"]]
    checks, met = targets(seq_policy, seq_rows)
    doc = (
        f"# Simulation: {reps} replications per scenario (seed {seed})\n\n"
        f"Traffic: {traffic}\n\nPolicy defaults: {seq_policy.to_dict()}\n\n"
        "Each rate is the share of replications, with its exact 95 % interval. False promotion: promoted "
        "although the truth is not better than the margin (scenarios of kind *not better* and *sample loss*; "
        "novelty is judged on its own). False rollback: rolled back for a cause the truth does not support, "
        "or halted without a sample loss. Rolled back within 2 evals: by the second scheduled evaluation "
        "(2 min), counting the harm checks that run every "
        f"{traffic.harm_interval_s:.0f} s in between; requests count once their 5 s bucket is whole and the "
        "log has settled, every number folded from per-bucket aggregates by the worker's fold "
        "(analysis/fold.py). "
        "Times: minutes to a promote/rollback/halt decision (inconclusive runs end at the 6 h limit).\n\n"
        f"## Targets (sequential policy)\n\n{checks}\n"
        f"{table(seq_policy, seq_rows)}\n"
        f"### Power curve (sequential; constant lift, 20 req/s)\n\n{power_table(results['sequential'])}\n"
        "### The threshold rule, for comparison (unsafe under repeated looks)\n\n"
        f"{table(thr_policy, [r for _, r in results['threshold']])}\n"
        f"Run time: {elapsed:.0f} s wall clock with {jobs} worker processes, {cpu:.0f} s of CPU in all\n"
        f"\n{users_table}\n{mrr_table}"
    )
    return Report(
        reps=reps,
        seed=seed,
        jobs=jobs,
        traffic=traffic,
        policy=seq_policy,
        sequential=results["sequential"],
        threshold=results["threshold"],
        targets=checks,
        met=met,
        markdown=doc,
        elapsed_s=elapsed,
        cpu_s=cpu,
    )


REPLAY_SCENARIOS = ("A/A", "accuracy +3 pts", "errors +5 pts", "+0.8 pt, both arms +2 pts/h (drift)")
