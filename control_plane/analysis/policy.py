"""The rollout policy: its settings, and its two rules ("sequential", "threshold") over arrays of evidence.

The rules work on numpy arrays so that `decide()` (one rollout) and the simulation (thousands of
replications) run exactly the same logic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

import numpy as np

from control_plane.analysis import guardrails, power, strata
from control_plane.analysis import sequential as seq
from control_plane.analysis.policy_names import NAMES, SEQUENTIAL
from control_plane.analysis.ranking import MAX_POSITION, Metric
from control_plane.analysis.types import Action


@dataclass(frozen=True)
class Policy:
    """How a rollout is judged; every number the rules use, with units in the names."""

    name: str = (
        "sequential"  # "sequential" (always-valid tests) or "threshold" (the user's point-estimate rule)
    )
    steps: tuple[int, ...] = (10, 25, 50)  # canary weights in order; promotion only from the last
    accuracy_margin: float = 0.01  # promote only if the canary's accuracy gain exceeds this (proportion)
    p99_ratio: float = 1.05  # canary p99 may be at most this times the baseline's
    error_margin: float = 0.005  # canary error rate may be at most this much above the baseline's
    alpha: float = 0.05  # error rate of each always-valid test that can promote or judge accuracy
    # Error rate of the two harm tests (errors, p99), which only ever roll back. Looser than alpha on
    # purpose: a false rollback costs a redeploy, a missed regression costs users, and at 10% of
    # 20 requests/s (±50 % over the hour) 0.1 catches a 5-point error regression within two evaluations
    # only ~95 % of the time (`recsys simulate`). At the margin itself it rolls back at most this often
    # (the simulation: ~10 %); a canary equal to the baseline, under 1 %.
    harm_alpha: float = 0.2
    srm_p: float = 0.001  # a sample-ratio-mismatch p-value below this halts the rollout
    step_min_duration_s: float = 300.0  # a step lasts at least this long before advancing or promoting
    max_duration_s: float = 6 * 3600.0  # past this without a decision: inconclusive
    window_s: float = 3600.0  # the threshold rule's rolling window (the sequential rule uses all data)
    label_window_s: float | None = (
        None  # the attribution window (s): a click within it is positive; None: the stack's
    )
    min_labelled_per_arm: int | None = None  # None: from a power calculation (see `labelled_minimum`)
    min_requests_per_arm: int = 100  # requests per arm before error harm is judged
    min_latency_samples: int = 200  # latencies per arm before a p99 is judged
    expected_n: int | None = None  # labels per arm at which a decision is expected; None: power calculation
    harm_expected_n: int = 500  # latencies at which a p99 harm should show (tunes that bound's mixture)
    planning_accuracy: float = 0.78  # baseline accuracy assumed by the power calculation
    target_lift: float = 0.02  # the accuracy gain the rollout should detect with `target_power`
    target_power: float = 0.8
    # The shadow phase (0: none). With a percent, the rollout begins with the candidate at weight 0 while
    # Traefik mirrors that share of the weighted requests to it (answers discarded); its errors and p99
    # on those copies are compared with the baseline's on the live requests of the same window. Any
    # harm (the always-valid harm tests at `harm_alpha`) stops it there; it gets the first step's weight
    # once it has run `shadow_min_duration_s`, with at least min_requests_per_arm / min_latency_samples
    # copies, no harm shown, and its error difference and p99 ratio within `error_margin` / `p99_ratio`.
    shadow_percent: int = 0
    shadow_min_duration_s: float = 120.0
    # What the rule decides on (analysis/ranking.py): "accuracy" (every labelled prediction, as before),
    # or a /recommend ranking metric over closed exposures: "ctr_at_k" (click at position <= metric_k),
    # "mrr" (reciprocal rank of the click) or "ndcg". With a ranking metric, accuracy_margin,
    # planning_accuracy and target_lift are in that metric's units (a proportion, or a mean in [0, 1]).
    metric: str = Metric.ACCURACY.value
    metric_k: int = 10  # the k of ctr_at_k

    @property
    def is_sequential(self) -> bool:
        """Always-valid tests over all of the rollout's data (and the harm checks between evaluations);
        otherwise the threshold rule on point estimates over a rolling window. `name` is what is stored."""
        return self.name == SEQUENTIAL

    @property
    def decision_metric(self) -> Metric:
        return Metric(self.metric)

    @property
    def metric_label(self) -> str:
        return self.decision_metric.label(self.metric_k)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps) if isinstance(self.steps, list) else self.steps)
        _validate(self)

    @property
    def labelled_minimum(self) -> int:
        """Labels per arm before any label-based decision: explicit, or enough to see a 5-point change."""
        if self.min_labelled_per_arm is not None:
            return self.min_labelled_per_arm
        return power.minimum_labelled(self.planning_accuracy, 0.05, self.alpha, self.target_power)

    @property
    def planned_n(self) -> int:
        """Labels per arm at which a decision is expected: explicit, or the fixed-horizon power calculation."""
        if self.expected_n is not None:
            return self.expected_n
        return power.samples_per_arm(
            self.planning_accuracy, self.target_lift, self.accuracy_margin, self.alpha, self.target_power
        )

    @property
    def srm_expected_n(self) -> float:
        """Requests (all roles) at which the sample-ratio test's mixture is tuned: the planned labels per
        arm at the last step's share."""
        return self.planned_n * 100.0 / self.steps[-1]

    def window_start(self, started_at: float, now: float) -> float:
        """Where this policy's observations begin: the rollout's start (sequential) or the rolling window."""
        return started_at if self.is_sequential else max(started_at, now - self.window_s)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings; `from_dict(to_dict())` gives the same policy back."""
        d = dataclasses.asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Policy:
        """Build a policy from (partial) settings; unknown keys or bad values raise ValueError naming the field."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy field(s): {', '.join(unknown)}")
        if "steps" in data:
            steps = data["steps"]
            if not isinstance(steps, list | tuple):
                raise ValueError(f"steps must be a list of weights, got {steps!r}")
            data["steps"] = tuple(steps)
        return cls(**data)

    @classmethod
    def fast(cls, **overrides: Any) -> Policy:
        """A demo preset: half-minute steps, small samples, a half-hour limit, a looser p99 allowance."""
        # A few thousand requests cannot pin a p99 within 5% (that takes ~60k per arm at typical tails),
        # so the demo allows 1.25x; everything else keeps the user's margins.
        base = dict(
            step_min_duration_s=30.0,
            max_duration_s=1800.0,
            window_s=300.0,
            label_window_s=5.0,
            min_labelled_per_arm=200,
            min_requests_per_arm=50,
            min_latency_samples=200,
            expected_n=2000,
            harm_expected_n=200,
            p99_ratio=1.25,
        )
        return cls(**{**base, **overrides})


def _validate(p: Policy) -> None:
    """Raise ValueError naming the first field whose value makes no sense."""

    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"policy field {field} must be {what}, got {getattr(p, field)!r}")

    def is_num(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(p.name in NAMES, "name", f"one of {', '.join(NAMES)}")
    metrics = [m.value for m in Metric]
    need(isinstance(p.metric, str) and p.metric in metrics, "metric", f"one of {', '.join(metrics)}")
    need(
        is_int(p.metric_k) and 1 <= p.metric_k <= MAX_POSITION,
        "metric_k",
        f"an integer from 1 to {MAX_POSITION}",
    )
    need(
        isinstance(p.steps, tuple)
        and len(p.steps) > 0
        and all(is_int(s) and 0 < s < 100 for s in p.steps)
        and all(a < b for a, b in zip(p.steps, p.steps[1:], strict=False)),
        "steps",
        "increasing integer weights between 1 and 99",
    )
    for f, lo, hi in (
        ("accuracy_margin", 0.0, 1.0),
        ("error_margin", 0.0, 1.0),
        ("planning_accuracy", 1e-9, 1 - 1e-9),
        ("target_power", 1e-9, 1 - 1e-9),
        ("target_lift", 1e-9, 1.0),
    ):
        need(is_num(getattr(p, f)) and lo <= getattr(p, f) <= hi, f, f"a number in [{lo:g}, {hi:g}]")
    for f in ("alpha", "harm_alpha", "srm_p"):
        need(is_num(getattr(p, f)) and 0 < getattr(p, f) < 0.5, f, "a number in (0, 0.5)")
    need(is_num(p.p99_ratio) and p.p99_ratio >= 1.0, "p99_ratio", "a number >= 1")
    need(is_num(p.step_min_duration_s) and p.step_min_duration_s >= 0, "step_min_duration_s", "a number >= 0")
    for f in ("max_duration_s", "window_s"):
        need(is_num(getattr(p, f)) and getattr(p, f) > 0, f, "a positive number of seconds")
    need(
        is_int(p.shadow_percent) and 0 <= p.shadow_percent <= 100,
        "shadow_percent",
        "an integer from 0 to 100",
    )
    need(
        is_num(p.shadow_min_duration_s) and p.shadow_min_duration_s >= 0,
        "shadow_min_duration_s",
        "a number of seconds >= 0",
    )
    for f in ("min_requests_per_arm", "harm_expected_n"):
        need(is_int(getattr(p, f)) and getattr(p, f) >= 1, f, "a positive integer")
    need(
        is_int(p.min_latency_samples) and p.min_latency_samples >= 100,
        "min_latency_samples",
        "an integer >= 100",
    )
    need(
        p.label_window_s is None or (is_num(p.label_window_s) and p.label_window_s >= 0),
        "label_window_s",
        "a number of seconds >= 0 or null",
    )
    for f in ("min_labelled_per_arm", "expected_n"):
        v = getattr(p, f)
        need(v is None or (is_int(v) and v >= 1), f, "a positive integer or null")
    need(
        p.expected_n is not None or p.target_lift > p.accuracy_margin, "target_lift", "above accuracy_margin"
    )


class Cause(IntEnum):
    """Why a rule chose its action (the decision's reason is built from this and the numbers)."""

    SRM = 0  # traffic does not match the weights: halt
    ERRORS = 1  # canary errors confidently (or clearly) above the margin: roll back
    LATENCY = 2  # canary p99 confidently (or clearly) above the ratio: roll back
    TIME_LIMIT = 3  # no decision within max_duration_s: inconclusive
    MIN_SAMPLE = 4  # not enough labels or latencies yet: hold
    ACCURACY_WORSE = 5  # canary accuracy confidently below the baseline's: roll back
    FUTILITY = 6  # canary gain confidently below the margin: it can never be promoted, roll back
    STEP_TIME = 7  # the step has not lasted step_min_duration_s: hold
    WAITING = 8  # rules not (yet) met: hold
    PASSED = 9  # rules met: advance, or promote at the last step
    NOVELTY = 10  # the combined gain passes but the last step's own gain does not (yet): hold


# types.Action as the rules' arrays hold it (Action.code), under short names for the rule tables.
HOLD, ADVANCE, PROMOTE, ROLLBACK, HALT, INCONCLUSIVE = (
    a.code
    for a in (Action.HOLD, Action.ADVANCE, Action.PROMOTE, Action.ROLLBACK, Action.HALT, Action.INCONCLUSIVE)
)


@dataclass(frozen=True)
class Evidence:
    """The numbers the rules need at one evaluation, as arrays (one element per rollout or replication)."""

    requests_c: np.ndarray
    errors_c: np.ndarray
    requests_b: np.ndarray
    errors_b: np.ndarray
    labelled_c: np.ndarray
    correct_c: np.ndarray
    labelled_b: np.ndarray
    correct_b: np.ndarray
    latencies_c: np.ndarray  # how many latencies each arm's p99 comes from
    latencies_b: np.ndarray
    p99_ratio: np.ndarray  # point estimate, canary over baseline
    p99_ratio_lower: np.ndarray  # always-valid lower bound (harm side)
    p99_ratio_upper: np.ndarray  # always-valid upper bound (non-inferiority side)
    srm_p: np.ndarray  # always-valid sample-ratio-mismatch p-value; 1.0 while there is too little traffic
    srm_p_fixed: np.ndarray  # the same chi-square's fixed-sample p-value: a promotion needs it clean too
    elapsed_s: np.ndarray
    step_elapsed_s: np.ndarray
    step_index: np.ndarray
    running_p: np.ndarray  # the smallest superiority p-value seen so far (shown; no rule acts on it)
    # The pooled accuracy difference's variance with users as the unit (analysis/user_level.py); None:
    # requests are the unit. The ramp-aware variance is scaled by the design effect it implies.
    accuracy_var: np.ndarray | None = None
    # The same difference's variance with requests as the unit, when the decision metric is a ranking
    # metric (its per-exposure variance, not the binomial one); None: the binomial one of the counts.
    request_var: np.ndarray | None = None
    # Accuracy per period of constant weights (one per step), the arms' means and variances of the mean
    # (strata.ArmPeriods); None: one period, from the pooled counts above.
    periods_c: strata.ArmPeriods | None = None
    periods_b: strata.ArmPeriods | None = None
    # always-valid p that the log misses one role's requests more than the others' (srm.loss_p_values,
    # from the router's own counts); None: the router's counts are not known
    loss_p: np.ndarray | None = None


@dataclass(frozen=True)
class HarmTests:
    """The two harm tests (they only ever roll back), one element per rollout."""

    err: dict[str, np.ndarray]  # guardrails.rate_tests: diff, p_harm, p_noninferior, tau2
    err_harm: np.ndarray  # errors confidently beyond the margin
    lat_harm: np.ndarray  # p99 ratio confidently beyond the allowance


@dataclass(frozen=True)
class RuleStats:
    """What a rule computed on the way to its action: arrays with one element per rollout (or replication),
    or Python scalars once `first()` took decide()'s one rollout. None: not computed by this rule (the
    threshold rule has no always-valid tests; the harm check computes only `p_error_harm`)."""

    # the gates and the clock, both rules (_common)
    enough_requests: Any = None
    enough_latency: Any = None
    enough_labels: Any = None
    srm: Any = None
    srm_suspect: Any = None
    timed_out: Any = None
    step_done: Any = None
    last_step: Any = None
    # the estimates and what the promotion needs, both rules
    accuracy_diff: Any = None
    error_diff: Any = None
    superior: Any = None
    error_noninferior: Any = None
    latency_noninferior: Any = None
    # the sequential rule's always-valid tests
    accuracy_var: Any = None
    accuracy_tau2: Any = None
    p_superior: Any = None
    p_futile: Any = None
    p_worse: Any = None
    recent_diff: Any = None
    recent_var: Any = None
    recent_lower: Any = None
    p_recent: Any = None
    recent_holds: Any = None
    p_error_harm: Any = None
    p_error_noninferior: Any = None
    error_tau2: Any = None

    def first(self) -> RuleStats:
        """The first rollout's statistics as Python scalars (bool, float): decide() judges one rollout."""
        return RuleStats(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else np.asarray(v).reshape(-1)[0].item()
                for f in dataclasses.fields(self)
            }
        )


def design_effect(user_var, correct_c, labelled_c, correct_b, labelled_b, request_var=None) -> np.ndarray:
    """How much clustering by user inflates the accuracy difference's variance (Kish's design effect):
    the users-as-clusters (delta-method) variance of the pooled difference over its requests-as-units
    variance, at least 1. The ramp-aware estimate's per-step variances are scaled by it, since the steps
    are not read per user. `request_var`: the requests-as-units variance when the metric is not a
    proportion (a ranking metric's, analysis/ranking.py); None: the two proportions' binomial one."""
    if request_var is None:
        _, request_var = seq.proportion_diff(correct_c, labelled_c, correct_b, labelled_b)
    request_var = np.asarray(request_var, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        deff = np.asarray(user_var, dtype=float) / request_var
    return np.maximum(1.0, np.where(np.isfinite(deff), deff, 1.0))


def _clustering(ev: Evidence) -> np.ndarray | float:
    if ev.accuracy_var is None:
        return 1.0
    return design_effect(
        ev.accuracy_var, ev.correct_c, ev.labelled_c, ev.correct_b, ev.labelled_b, ev.request_var
    )


def accuracy_estimate(ev: Evidence) -> strata.Combined:
    """The ramp-aware accuracy difference: per-period differences combined (strata.py)."""
    if ev.periods_c is None or ev.periods_b is None:
        pc = strata.proportion_periods(ev.correct_c[..., None], ev.labelled_c[..., None])
        pb = strata.proportion_periods(ev.correct_b[..., None], ev.labelled_b[..., None])
        return strata.combine(pc, pb)
    return strata.combine(ev.periods_c, ev.periods_b)


def harm(policy: Policy, ev: Evidence) -> HarmTests:
    """The two harm tests alone (they only ever roll back): what the faster harm cadence runs."""
    err = guardrails.rate_tests(
        ev.errors_c,
        ev.requests_c,
        ev.errors_b,
        ev.requests_b,
        policy.error_margin,
        policy.alpha,
        policy.planned_n,
    )
    # The error e-value is exact whatever the canary's sample (Ville, no CLT): no minimum of canary requests.
    # The baseline, whose observed rate is plugged in (guardrails.rate_tests), needs enough requests.
    err_harm = (
        (ev.requests_b >= policy.min_requests_per_arm)
        & (ev.requests_c > 0)
        & (err["p_harm"] <= policy.harm_alpha)
    )
    lat_harm = (
        (ev.latencies_c >= policy.min_latency_samples)
        & (ev.latencies_b >= policy.min_latency_samples)
        & (ev.p99_ratio_lower > policy.p99_ratio)  # the bound is at harm_alpha
    )
    return HarmTests(err, err_harm, lat_harm)


def _loss_p(ev: Evidence) -> np.ndarray:
    return np.ones_like(np.asarray(ev.srm_p, dtype=float)) if ev.loss_p is None else ev.loss_p


def evaluate(policy: Policy, ev: Evidence) -> tuple[np.ndarray, np.ndarray, RuleStats]:
    """Apply the policy's rule: (action codes, causes, statistics), one element per rollout."""
    rule = _sequential if policy.is_sequential else _threshold
    return rule(policy, ev)


def _select(
    cases: list[tuple[np.ndarray, int, Cause]], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The first case that holds decides: (action, cause) arrays."""
    conds = [np.broadcast_to(c, shape) for c, _, _ in cases]
    action = np.select(conds, [a for _, a, _ in cases], default=HOLD)
    cause = np.select(conds, [int(c) for _, _, c in cases], default=int(Cause.WAITING))
    return action, cause


def _common(policy: Policy, ev: Evidence) -> RuleStats:
    """Sample-size gates and the clock, shared by both rules."""
    return RuleStats(
        enough_requests=(ev.requests_c >= policy.min_requests_per_arm)
        & (ev.requests_b >= policy.min_requests_per_arm),
        enough_latency=(ev.latencies_c >= policy.min_latency_samples)
        & (ev.latencies_b >= policy.min_latency_samples),
        enough_labels=(ev.labelled_c >= policy.labelled_minimum) & (ev.labelled_b >= policy.labelled_minimum),
        srm=(ev.srm_p < policy.srm_p) | (_loss_p(ev) < policy.srm_p),
        # a fixed-sample chi-square below srm_p is not enough to halt, but enough to block a promotion
        srm_suspect=ev.srm_p_fixed < policy.srm_p,
        timed_out=ev.elapsed_s >= policy.max_duration_s,
        step_done=ev.step_elapsed_s >= policy.step_min_duration_s,
        last_step=ev.step_index >= len(policy.steps) - 1,
    )


def _sequential(policy: Policy, ev: Evidence) -> tuple[np.ndarray, np.ndarray, RuleStats]:
    """Always-valid tests: superiority by the margin, overall and in the last step on its own, and
    non-inferiority on guardrails to promote."""
    g = _common(policy, ev)
    a = policy.alpha
    est = accuracy_estimate(ev)
    deff = _clustering(ev)  # users as the unit: the steps' variances inflated alike
    diff, var = est.diff, est.var * deff
    p0 = policy.planning_accuracy
    tau2 = seq.mixing_variance(2 * p0 * (1 - p0), policy.planned_n, a)
    # The current p-value, not its running minimum: the minimum would lock in an early (novelty) effect.
    p_sup = seq.one_sided_p(diff, var, tau2, policy.accuracy_margin, +1)
    p_fut = seq.one_sided_p(diff, var, tau2, policy.accuracy_margin, -1)
    p_worse = seq.one_sided_p(diff, var, tau2, 0.0, -1)
    # Novelty: the current step's own difference must clear the margin on its own always-valid test too.
    last_diff, last_var = strata.period_at(est.period_diff, est.period_var, ev.step_index)
    last_var = last_var * deff
    p_recent = seq.one_sided_p(last_diff, last_var, tau2, policy.accuracy_margin, +1)
    recent_lower = seq.one_sided_bound(last_diff, last_var, tau2, a, +1)
    h = harm(policy, ev)
    err = h.err
    labels = g.enough_labels
    sup, ni_err = p_sup <= a, g.enough_requests & (err["p_noninferior"] <= a)
    recent = p_recent <= a
    ni_lat = g.enough_latency & (ev.p99_ratio_upper <= policy.p99_ratio)
    safe = g.enough_requests & g.enough_latency
    ready = sup & ni_err & ni_lat
    worse, futile = p_worse <= a, p_fut <= a
    shape = np.broadcast(diff, ev.srm_p, ev.elapsed_s).shape
    action, cause = _select(
        [
            (g.srm, HALT, Cause.SRM),
            (h.err_harm, ROLLBACK, Cause.ERRORS),
            (h.lat_harm, ROLLBACK, Cause.LATENCY),
            (g.timed_out, INCONCLUSIVE, Cause.TIME_LIMIT),
            (~labels | ~safe, HOLD, Cause.MIN_SAMPLE),
            # a terminal verdict on accuracy is one look: a fixed-sample mismatch there halts instead
            ((worse | futile) & g.srm_suspect, HALT, Cause.SRM),
            (worse, ROLLBACK, Cause.ACCURACY_WORSE),
            (futile, ROLLBACK, Cause.FUTILITY),
            (~g.step_done, HOLD, Cause.STEP_TIME),
            # earlier steps advance once safe; the efficacy decision is taken at the last step
            (~g.last_step, ADVANCE, Cause.PASSED),
            (ready & g.srm_suspect, HALT, Cause.SRM),
            (ready & ~recent, HOLD, Cause.NOVELTY),
            (ready, PROMOTE, Cause.PASSED),
        ],
        shape,
    )
    stats = replace(
        g,
        accuracy_diff=diff,
        accuracy_var=var,
        accuracy_tau2=np.broadcast_to(tau2, shape),
        p_superior=p_sup,
        p_futile=p_fut,
        p_worse=p_worse,
        recent_diff=last_diff,
        recent_var=last_var,
        recent_lower=recent_lower,
        p_recent=p_recent,
        recent_holds=recent,
        error_diff=err["diff"],
        p_error_harm=err["p_harm"],
        p_error_noninferior=err["p_noninferior"],
        error_tau2=err["tau2"],
        superior=sup,
        error_noninferior=ni_err,
        latency_noninferior=ni_lat,
    )
    return action, cause, stats


def _threshold(policy: Policy, ev: Evidence) -> tuple[np.ndarray, np.ndarray, RuleStats]:
    """The user's rule on point estimates over the window; 'clearly broken' guardrails are twice the margin."""
    g = _common(policy, ev)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_c = np.where(ev.labelled_c > 0, ev.correct_c / np.maximum(ev.labelled_c, 1), 0.0)
        acc_b = np.where(ev.labelled_b > 0, ev.correct_b / np.maximum(ev.labelled_b, 1), 0.0)
        err_c = np.where(ev.requests_c > 0, ev.errors_c / np.maximum(ev.requests_c, 1), 0.0)
        err_b = np.where(ev.requests_b > 0, ev.errors_b / np.maximum(ev.requests_b, 1), 0.0)
    diff, err_diff = acc_c - acc_b, err_c - err_b
    err_broken = g.enough_requests & (err_diff > 2 * policy.error_margin)
    lat_broken = g.enough_latency & (ev.p99_ratio > 1 + 2 * (policy.p99_ratio - 1))
    acc_ok, err_ok = diff > policy.accuracy_margin, err_diff <= policy.error_margin
    lat_ok = ev.p99_ratio <= policy.p99_ratio
    ready = g.enough_labels & g.enough_requests & g.enough_latency
    shape = np.broadcast(diff, ev.srm_p, ev.elapsed_s).shape
    passed = acc_ok & err_ok & lat_ok
    action, cause = _select(
        [
            (g.srm, HALT, Cause.SRM),
            (g.timed_out, INCONCLUSIVE, Cause.TIME_LIMIT),
            # the user's rule: no decision, not even a rollback, before the minimum sample
            (~ready, HOLD, Cause.MIN_SAMPLE),
            (err_broken, ROLLBACK, Cause.ERRORS),
            (lat_broken, ROLLBACK, Cause.LATENCY),
            (~g.step_done, HOLD, Cause.STEP_TIME),
            (passed & g.last_step & g.srm_suspect, HALT, Cause.SRM),
            (passed & g.last_step, PROMOTE, Cause.PASSED),
            (passed, ADVANCE, Cause.PASSED),
        ],
        shape,
    )
    stats = replace(
        g,
        accuracy_diff=diff,
        error_diff=err_diff,
        superior=acc_ok,
        error_noninferior=err_ok,
        latency_noninferior=lat_ok,
    )
    return action, cause, stats
