"""decide(state, observations, policy) -> Decision: the one entry point from the control plane into analysis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from control_plane.analysis import guardrails, srm, strata
from control_plane.analysis import sequential as seq
from control_plane.analysis.jsonable import jsonable as _jsonable
from control_plane.analysis.policy import (
    Cause,
    Evidence,
    Policy,
    RuleStats,
    design_effect,
    evaluate,
    harm,
)
from control_plane.analysis.ranking import metric_periods, metric_sums, on_metric, unit_variance
from control_plane.analysis.shadow import decide_shadow
from control_plane.analysis.types import (
    PROMOTED_WEIGHT,
    Action,
    ArmObservation,
    Decision,
    Observations,
    Phase,
    RolloutState,
    RuleOutcome,
)
from control_plane.analysis.user_level import MetricTotals

SUPERIORITY_KEY = "accuracy_superiority"  # key of the running p-value in RolloutState.running_p_values


def decide(state: RolloutState, obs: Observations, policy: Policy) -> Decision:
    """Decide one evaluation of a rollout from its observations under its policy; no I/O."""
    if state.phase is Phase.SHADOW:
        return decide_shadow(state, obs, policy)
    if state.phase is not Phase.PROGRESSING:
        why = {Phase.PAUSED: "rollout is paused by an operator", Phase.PENDING: "rollout has not started"}
        return Decision(
            Action.HOLD,
            why.get(state.phase, f"rollout is {state.phase}; nothing to decide"),
            state.canary_weight,
        )
    if not 0 <= state.step_index < len(policy.steps):
        raise ValueError(f"step_index {state.step_index} is outside the policy's {len(policy.steps)} steps")
    canary, baseline = obs.arms.get("canary"), obs.arms.get("baseline")
    if canary is None or baseline is None:
        missing = " and ".join(r for r in ("baseline", "canary") if r not in obs.arms)
        return Decision(Action.NO_DATA, f"no observations for the {missing}", state.canary_weight)
    canary, baseline = _on_metric(policy, canary), _on_metric(policy, baseline)
    n = _numbers(state, obs, policy, canary, baseline)
    action, cause, st = evaluate(policy, _evidence(n, state))
    code, why = int(action[0]), Cause(int(cause[0]))
    st = st.first()
    act = Action.of_code(code)
    next_weight = {
        Action.ADVANCE: policy.steps[min(state.step_index + 1, len(policy.steps) - 1)],
        Action.PROMOTE: PROMOTED_WEIGHT,
        Action.HOLD: state.canary_weight,
    }.get(act, 0)
    stats = _stats(policy, state, obs, n, st, why)
    reason = _reason(policy, state, n, st, act, why, next_weight)
    return Decision(act, reason, next_weight, _rules(policy, n, st), _jsonable(stats))


def decide_harm(state: RolloutState, obs: Observations, policy: Policy) -> Decision | None:
    """The harm tests alone (the faster harm cadence): a rollback decision if errors or p99 are confidently
    beyond their margin, else None. The same tests `decide()` runs first; no I/O."""
    if state.phase is not Phase.PROGRESSING or not policy.is_sequential:
        return None
    canary, baseline = obs.arms.get("canary"), obs.arms.get("baseline")
    if canary is None or baseline is None:
        return None
    canary, baseline = _on_metric(policy, canary), _on_metric(policy, baseline)
    n = _numbers(state, obs, policy, canary, baseline)
    h = harm(policy, _evidence(n, state))
    if not (bool(h.err_harm[0]) or bool(h.lat_harm[0])):
        return None
    why = Cause.ERRORS if bool(h.err_harm[0]) else Cause.LATENCY
    st = RuleStats(p_error_harm=float(h.err["p_harm"][0]))
    stats = _stats(policy, state, obs, n, st, why)
    stats["harm_check"] = True
    reason = _reason(policy, state, n, st, Action.ROLLBACK, why, 0) + " (harm check between evaluations)"
    return Decision(Action.ROLLBACK, reason, 0, (), _jsonable(stats))


@dataclass(frozen=True)
class Numbers:
    """Every estimate and interval of one evaluation, whichever rule acts on them (the reason, the
    rules and the stored statistics are written from these)."""

    c: ArmObservation  # the canary, on the policy's decision metric
    b: ArmObservation  # the baseline, likewise
    pc: strata.ArmPeriods  # per-step summaries, canary
    pb: strata.ArmPeriods  # per-step summaries, baseline
    periods: strata.Combined  # the per-step differences combined
    diff: float  # the combined difference (canary minus baseline)
    var: float  # its variance (scaled by the design effect when users are the unit)
    tau2: float  # the always-valid mixture's variance
    acc_lower: float  # the difference's always-valid bounds
    acc_upper: float
    recent_diff: float  # the current step's own difference, variance and lower bound (novelty)
    recent_var: float
    recent_lower: float
    err: dict[str, float]  # guardrails.rate_tests: diff, p_harm, p_noninferior, tau2
    err_lower: float
    err_upper: float
    lat: dict[str, Any]  # guardrails.p99_ratio: p99s, ratio and its bounds
    srm: dict[str, Any] | None  # the sample-ratio check; None: too little traffic
    srm_p: float | None  # its always-valid p
    loss: dict[str, Any] | None  # the log-loss check against the router's counts; None: not known
    step_obs: dict[str, int]  # this step's requests (or first-assigned users) per role
    weights: dict[str, int]  # this step's weights
    elapsed_s: float
    step_elapsed_s: float
    users: dict[str, Any] | None  # users as the unit (_user_unit); None: requests are
    deff: float  # the design effect applied to the variances


def _on_metric(policy: Policy, arm: ArmObservation) -> ArmObservation:
    """The arm with `labelled`/`correct` on the policy's decision metric (analysis/ranking.py)."""
    return on_metric(arm, policy.decision_metric, policy.metric_k)


def _numbers(
    state: RolloutState, obs: Observations, policy: Policy, c: ArmObservation, b: ArmObservation
) -> Numbers:
    """Every estimate and interval shown with a decision, whichever rule acts on them."""
    a, p0 = policy.alpha, policy.planning_accuracy
    pc, pb = _arm_periods(c, policy), _arm_periods(b, policy)
    est = strata.combine(pc, pb)
    diff, var = est.diff[0], est.var[0]
    users = _user_unit(obs, policy, c, b)  # requests that name users: users are the unit (user_level.py)
    deff = 1.0
    if users is not None:  # the decision metric's per-user sums: accuracy or a ranking metric
        deff = float(
            design_effect(
                users["accuracy_var"], c.correct, c.labelled, b.correct, b.labelled, users["request_var"]
            )
        )
        var = var * deff
    tau2 = seq.mixing_variance(2 * p0 * (1 - p0), policy.planned_n, a)
    recent_diff, recent_var = strata.period_at(est.period_diff, est.period_var, [state.step_index])
    recent_var = recent_var * deff
    err = guardrails.rate_tests(
        c.errors, c.requests, b.errors, b.requests, policy.error_margin, a, policy.planned_n
    )
    err_lower, err_upper = guardrails.rate_bounds(
        c.errors, c.requests, b.errors, b.requests, err["tau2"], a, policy.harm_alpha
    )
    lat = guardrails.p99_ratio(
        c.latency,
        b.latency,
        a,
        policy.planned_n,
        policy.harm_expected_n,
        harm_alpha=policy.harm_alpha,
    )
    step_obs = {r: arm.step_requests for r, arm in obs.arms.items()}
    periods = _period_requests(obs)
    if users is not None and users["new_users"]:  # users counted at first assignment, not requests
        step_obs = {r: users["new_users"].get(r, 0) for r in obs.arms}
        srm_check = srm.srm_check(step_obs, obs.step_weights, policy.planned_n, policy.srm_p)
    elif periods:  # every step's requests against the weights the router applied then
        srm_check = srm.stratified_check(
            [counts for counts, _ in periods],
            [w for _, w in periods],
            policy.srm_expected_n,
            policy.srm_p,
        )
    else:
        srm_check = srm.srm_check(step_obs, obs.step_weights, policy.planned_n, policy.srm_p)
    loss = None
    if obs.assigned is not None:
        roles = sorted(obs.assigned)
        logged = [obs.arms[r].requests if r in obs.arms else 0 for r in roles]
        loss = {
            "assigned": dict(obs.assigned),
            "logged": dict(zip(roles, logged, strict=True)),
            "p_always_valid": float(
                srm.loss_p_values([[obs.assigned[r] for r in roles]], [logged], policy.srm_p)[0]
            ),
        }
    return Numbers(
        c=c,
        b=b,
        pc=pc,
        pb=pb,
        periods=est,
        recent_diff=float(recent_diff[0]),
        recent_var=float(recent_var[0]),
        loss=loss,
        diff=float(diff),
        var=float(var),
        tau2=float(tau2),
        recent_lower=float(seq.one_sided_bound(recent_diff[0], recent_var[0], tau2, a, +1)),
        acc_lower=float(seq.one_sided_bound(diff, var, tau2, a, +1)),
        acc_upper=float(seq.one_sided_bound(diff, var, tau2, a, -1)),
        err={k: float(v) for k, v in err.items()},
        err_lower=float(err_lower),
        err_upper=float(err_upper),
        lat=lat,
        srm=srm_check,
        srm_p=None if srm_check is None else srm_check["p_always_valid"],
        step_obs=step_obs,
        weights=dict(obs.step_weights),
        elapsed_s=obs.now - state.started_at,
        step_elapsed_s=obs.now - state.step_started_at,
        users=users,
        deff=deff,
    )


def _arm_periods(arm: ArmObservation, policy: Policy) -> strata.ArmPeriods:
    """One arm's per-step accuracy summaries, shape (1, steps); one period of the pooled counts if the
    observations were not read per step. A ranking metric's come from its sums (ranking.metric_periods)."""
    if policy.decision_metric.ranking:
        return metric_periods(arm, policy.decision_metric, policy.metric_k)
    if arm.periods:
        correct = [[p.correct for p in arm.periods]]
        labelled = [[p.labelled for p in arm.periods]]
    else:
        correct, labelled = [[arm.correct]], [[arm.labelled]]
    return strata.proportion_periods(correct, labelled)


def _period_requests(obs: Observations) -> list[tuple[dict[str, int], dict[str, int]]]:
    """Per period: (logged requests per role, weights then); empty unless every arm was read per period."""
    arms = {r: a for r, a in obs.arms.items() if a.version is not None}
    if not obs.periods or any(len(a.periods) != len(obs.periods) for a in arms.values()):
        return []
    return [
        ({r: a.periods[i].srm_requests for r, a in arms.items()}, dict(weights))
        for i, (_, weights) in enumerate(obs.periods)
    ]


def _evidence(n: Numbers, state: RolloutState) -> Evidence:
    """The numbers as the rules' one-element arrays."""
    c, b, lat = n.c, n.b, n.lat

    def arr(x: float) -> np.ndarray:
        return np.array([x], dtype=float)

    return Evidence(
        requests_c=arr(c.requests),
        errors_c=arr(c.errors),
        requests_b=arr(b.requests),
        errors_b=arr(b.errors),
        labelled_c=arr(c.labelled),
        correct_c=arr(c.correct),
        labelled_b=arr(b.labelled),
        correct_b=arr(b.correct),
        latencies_c=arr(c.latency.count),
        latencies_b=arr(b.latency.count),
        p99_ratio=arr(lat["ratio"] if math.isfinite(lat["ratio"]) else np.inf),
        p99_ratio_lower=arr(lat["lower"]),
        p99_ratio_upper=arr(lat["upper"]),
        srm_p=arr(1.0 if n.srm is None else n.srm["p_always_valid"]),
        srm_p_fixed=arr(1.0 if n.srm is None else n.srm["p"]),
        elapsed_s=arr(n.elapsed_s),
        step_elapsed_s=arr(n.step_elapsed_s),
        step_index=arr(state.step_index),
        running_p=arr(state.running_p_values.get(SUPERIORITY_KEY, 1.0)),
        periods_c=n.pc,
        periods_b=n.pb,
        loss_p=None if n.loss is None else arr(n.loss["p_always_valid"]),
        accuracy_var=None if n.users is None else arr(n.users["accuracy_var"]),
        request_var=None
        if n.users is None or n.users["request_var"] is None
        else arr(n.users["request_var"]),
    )


def _pts(x: float | None, signed: bool = True) -> str:
    """A proportion as percentage points: +2.4 pts."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:+.1f} pts" if signed else f"{100 * x:.1f} pts"


def _interval(n: Numbers) -> str:
    """The accuracy difference's two one-sided always-valid bounds: [+1.2, +3.6] pts."""
    return f"[{100 * n.acc_lower:+.1f}, {100 * n.acc_upper:+.1f}] pts"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _reason(
    policy: Policy, state: RolloutState, n: Numbers, st: RuleStats, act: Action, why: Cause, nxt: int
) -> str:
    """A readable sentence with the numbers behind the action."""
    c, b, lat, err = n.c, n.b, n.lat, n.err
    sequential = policy.is_sequential
    acc = f"canary {policy.metric_label} {_pts(n.diff)}" + (
        f" (always-valid bounds {_interval(n)})" if sequential else ""
    )
    errs = f"canary errors {_pct(c.error_rate)} vs baseline {_pct(b.error_rate)} ({_pts(err['diff'])})"
    p99 = f"p99 {lat['p99_canary']:.1f} ms vs {lat['p99_baseline']:.1f} ms (ratio {_ratio(lat['ratio'])})"
    step = f"step {state.step_index + 1} of {len(policy.steps)} at {policy.steps[state.step_index]}%"
    if why is Cause.SRM and n.loss is not None and n.loss["p_always_valid"] < policy.srm_p:
        lost = ", ".join(f"{r} {n.loss['logged'][r]}/{k}" for r, k in n.loss["assigned"].items())
        return (
            f"requests missing from the log: logged/assigned by the router {lost} (always-valid "
            f"p={_p(n.loss['p_always_valid'])} < {policy.srm_p:g}); halting, nothing is promoted"
        )
    if why is Cause.SRM:
        seen = ", ".join(f"{r} {k}" for r, k in n.step_obs.items())
        want = ", ".join(f"{r} {w}%" for r, w in n.weights.items())
        return (
            f"sample-ratio mismatch: {'users first assigned in' if n.users else 'requests of'} this step "
            f"{seen} against weights {want} (chi-square "
            f"{n.srm['chi_square']:.1f}, p={_p(n.srm['p'])}, always-valid p={_p(n.srm_p)} < "
            f"{policy.srm_p:g}); halting, nothing is promoted"
        )
    if why is Cause.ERRORS and sequential:
        return (
            f"{errs}: confidently worse than the {_pts(policy.error_margin, False)} margin (always-valid "
            f"lower bound {_pts(n.err_lower)}, p={_p(err['p_harm'])}); rolling back"
        )
    if why is Cause.ERRORS:
        return f"{errs}: more than twice the {_pts(policy.error_margin, False)} margin worse; rolling back"
    if why is Cause.LATENCY and sequential:
        return (
            f"canary {p99}: confidently above {policy.p99_ratio:.2f} (always-valid lower bound "
            f"{_ratio(lat['lower'])}); rolling back"
        )
    if why is Cause.LATENCY:
        return f"canary {p99}: above {1 + 2 * (policy.p99_ratio - 1):.2f}, twice the allowance; rolling back"
    if why is Cause.TIME_LIMIT:
        return (
            f"no decision after {n.elapsed_s / 3600:.1f} h (limit {policy.max_duration_s / 3600:.1f} h): "
            f"inconclusive; {acc}"
        )
    if why is Cause.MIN_SAMPLE:
        return (
            f"waiting for data: labelled {c.labelled}/{b.labelled} (canary/baseline, need "
            f"{policy.labelled_minimum}), requests {c.requests}/{b.requests} (need {policy.min_requests_per_arm}),"
            f" latencies {c.latency.count}/{b.latency.count} (need {policy.min_latency_samples})"
        )
    if why is Cause.ACCURACY_WORSE:
        return f"{acc}: confidently below the baseline (p={_p(st.p_worse)}); rolling back"
    if why is Cause.FUTILITY:
        return (
            f"{acc}: confidently below the {_pts(policy.accuracy_margin, False)} margin "
            f"(p={_p(st.p_futile)}), so it cannot be promoted; rolling back"
        )
    if why is Cause.NOVELTY:
        return (
            f"{acc}, running p={_p(st.p_superior)}, exceeds margin {_pts(policy.accuracy_margin, False)} "
            f"overall, but not yet in the last step on its own (step {state.step_index + 1}: "
            f"{_pts(n.recent_diff)}, always-valid lower bound {_pts(n.recent_lower)}, "
            f"p={_p(st.p_recent)}): novelty check blocks the promotion; holding"
        )
    if why is Cause.STEP_TIME:
        return f"{step} has run {n.step_elapsed_s:.0f} s of the {policy.step_min_duration_s:.0f} s minimum; holding"
    checks = _checks(policy, n, st)
    if act is Action.ADVANCE and sequential:
        return f"no harm at {step}: {errs}, {p99}; {acc} so far: advancing to {nxt}%"
    verdict = {Action.PROMOTE: "promoting", Action.ADVANCE: f"advancing to {nxt}%"}.get(
        act, f"holding at {step}"
    )
    return f"{'; '.join(checks)}: {verdict}"


def _checks(policy: Policy, n: Numbers, st: RuleStats) -> list[str]:
    """The promotion rules, each as a short clause saying whether it holds."""
    lat, err = n.lat, n.err
    m, r, e = _pts(policy.accuracy_margin, False), f"{policy.p99_ratio:.2f}", _pts(policy.error_margin, False)
    if policy.is_sequential:
        return [
            f"canary {policy.metric_label} {_pts(n.diff)} (always-valid bounds {_interval(n)}, running p="
            f"{_p(st.p_superior)}) {'exceeds' if st.superior else 'not yet above'} margin {m}",
            f"p99 ratio {_ratio(lat['ratio'])} (upper bound {_ratio(lat['upper'])}) "
            f"{'≤' if st.latency_noninferior else 'not yet shown ≤'} {r}",
            f"error diff {_pts(err['diff'])} (upper bound {_pts(n.err_upper)}, p={_p(err['p_noninferior'])}) "
            f"{'≤' if st.error_noninferior else 'not yet shown ≤'} {e}",
        ]
    return [
        f"canary {policy.metric_label} {_pts(n.diff)} {'exceeds' if st.superior else 'does not exceed'} margin {m}",
        f"p99 ratio {_ratio(lat['ratio'])} {'≤' if st.latency_noninferior else '>'} {r}",
        f"error diff {_pts(err['diff'])} {'≤' if st.error_noninferior else '>'} {e}",
    ]


def _rules(policy: Policy, n: Numbers, st: RuleStats) -> tuple[RuleOutcome, ...]:
    """Each rule checked at this evaluation, with what it compared."""
    a, lat, err = policy.alpha, n.lat, n.err
    labels, reqs, lats = st.enough_labels, st.enough_requests, st.enough_latency
    srm_ok = None if n.srm_p is None else n.srm_p >= policy.srm_p
    rules = [
        RuleOutcome(
            "sample_ratio",
            n.srm_p,
            policy.srm_p,
            srm_ok,
            "always-valid p of the chi-square of step requests vs weights",
        ),
        RuleOutcome(
            "time_limit",
            n.elapsed_s,
            policy.max_duration_s,
            n.elapsed_s < policy.max_duration_s,
            "seconds since the rollout started",
        ),
        RuleOutcome(
            "min_sample",
            float(min(n.c.labelled, n.b.labelled)),
            float(policy.labelled_minimum),
            bool(labels),
            "labelled predictions in the smaller arm",
        ),
        RuleOutcome(
            "step_duration",
            n.step_elapsed_s,
            policy.step_min_duration_s,
            bool(st.step_done),
            "seconds at this step",
        ),
    ]
    if policy.is_sequential:
        rules += [
            RuleOutcome(
                "error_harm",
                err["p_harm"],
                policy.harm_alpha,
                (err["p_harm"] > policy.harm_alpha) if reqs else None,
                f"always-valid p that errors exceed the margin; lower bound {_pts(n.err_lower)}",
            ),
            RuleOutcome(
                "latency_harm",
                lat["lower"],
                policy.p99_ratio,
                (lat["lower"] <= policy.p99_ratio) if lats else None,
                "always-valid lower bound of the p99 ratio",
            ),
            RuleOutcome(
                "accuracy_superiority",
                st.p_superior,
                a,
                bool(st.superior) if labels else None,
                f"always-valid p of gain > margin, per-step differences combined; bounds {_interval(n)}",
            ),
            RuleOutcome(
                "novelty_last_step",
                st.p_recent,
                a,
                bool(st.recent_holds) if labels else None,
                f"the last step's own always-valid p of gain > margin; lower bound {_pts(n.recent_lower)}",
            ),
            RuleOutcome(
                "accuracy_futility",
                st.p_futile,
                a,
                (st.p_futile > a) if labels else None,
                "always-valid p that the gain is below the margin",
            ),
            RuleOutcome(
                "error_noninferiority",
                err["p_noninferior"],
                a,
                bool(st.error_noninferior) if reqs else None,
                f"always-valid p that errors are within the margin; upper bound {_pts(n.err_upper)}",
            ),
            RuleOutcome(
                "latency_noninferiority",
                lat["upper"],
                policy.p99_ratio,
                bool(st.latency_noninferior) if lats else None,
                "always-valid upper bound of the p99 ratio",
            ),
        ]
    else:
        rules += [
            RuleOutcome(
                "accuracy_gain",
                n.diff,
                policy.accuracy_margin,
                bool(st.superior) if labels else None,
                f"canary minus baseline {policy.metric_label} over the window",
            ),
            RuleOutcome(
                "p99_ratio",
                lat["ratio"],
                policy.p99_ratio,
                bool(st.latency_noninferior) if lats else None,
                "canary p99 over baseline p99 over the window",
            ),
            RuleOutcome(
                "error_diff",
                err["diff"],
                policy.error_margin,
                bool(st.error_noninferior) if reqs else None,
                "canary minus baseline error rate over the window",
            ),
        ]
    return tuple(RuleOutcome(r.name, _num(r.value), _num(r.threshold), r.passed, r.detail) for r in rules)


def _stats(
    policy: Policy, state: RolloutState, obs: Observations, n: Numbers, st: RuleStats, why: Cause
) -> dict[str, Any]:
    """Estimates, intervals, p-values and sample sizes, as stored with the decision."""
    c, b, err, lat = n.c, n.b, n.err, n.lat
    return {
        "policy": policy.name,
        # what the "accuracy" numbers below are of: the policy's decision metric (analysis/ranking.py)
        "metric": {"name": policy.metric, "k": policy.metric_k, "label": policy.metric_label},
        "cause": why.name.lower(),
        "window_start": obs.window_start,
        "window_end": obs.window_end,
        "elapsed_s": n.elapsed_s,
        "step_elapsed_s": n.step_elapsed_s,
        "samples": {
            role: {
                "requests": arm.requests,
                "errors": arm.errors,
                "labelled": arm.labelled,
                "correct": arm.correct,
                "exposures": arm.ranked,  # /recommend answers closed: a ranking metric's sample
                "latencies": arm.latency.count,
                "step_requests": arm.step_requests,
            }
            for role, arm in obs.arms.items()
        },
        "accuracy": {
            "canary": c.accuracy,
            "baseline": b.accuracy,
            "diff": n.diff,
            "lower": n.acc_lower,
            "upper": n.acc_upper,
            "tau2": n.tau2,
            "p_superior": st.p_superior,
            "p_futile": st.p_futile,
            "p_worse": st.p_worse,
            "margin": policy.accuracy_margin,
        },
        "errors": {
            "canary": c.error_rate,
            "baseline": b.error_rate,
            "diff": err["diff"],
            "lower": n.err_lower,
            "upper": n.err_upper,
            "p_harm": err["p_harm"],
            "p_noninferior": err["p_noninferior"],
            "margin": policy.error_margin,
        },
        "latency": {**lat, "max_ratio": policy.p99_ratio},
        "srm": {**(n.srm or {}), "step_requests": n.step_obs, "weights": dict(obs.step_weights)},
        "log_loss_check": n.loss,
        "steps": _steps(obs, n),
        "novelty": {
            "rule": "promote only if the last step's own always-valid lower bound exceeds the margin",
            "step": state.step_index + 1,
            "diff": n.recent_diff,
            "lower": n.recent_lower,
            "p": st.p_recent,
            "passed": st.recent_holds,
            "verdict": _novelty_verdict(policy, st, why),
        }
        if policy.is_sequential
        else None,
        # the smallest p so far, shown for reference; no rule acts on it (it would lock in an early effect)
        "running_p_values": {
            SUPERIORITY_KEY: min(
                1.0 if st.p_superior is None else st.p_superior,
                state.running_p_values.get(SUPERIORITY_KEY, 1.0),
            )
        }
        if policy.is_sequential
        else {},
        "min_labelled_per_arm": policy.labelled_minimum,
        "expected_n": policy.planned_n,
        "unit": "request" if n.users is None else "user",
        "users": None if n.users is None else n.users["arms"],
    }


def _novelty_verdict(policy: Policy, st: RuleStats, why: Cause) -> str:
    """Which check blocked or allowed a promotion at this evaluation."""
    if why is Cause.NOVELTY:
        return "blocked: the last step's own gain is not yet above the margin"
    if why is Cause.PASSED and st.superior:
        return "allowed: the last step's own gain is above the margin"
    return "not reached"


def _steps(obs: Observations, n: Numbers) -> list[dict[str, Any]]:
    """Per step: its start, weights, each arm's labelled/correct, and the step's own difference."""
    est: strata.Combined = n.periods
    starts = obs.periods or ((obs.window_start, dict(obs.step_weights)),)
    out = []
    for i, (start, weights) in enumerate(starts):
        if i >= est.period_diff.shape[-1]:
            break
        v = float(est.period_var[0, i])
        out.append(
            {
                "step": i + 1,
                "start": start,
                "weights": dict(weights),
                "canary_labelled": int(n.pc.n[0, i]),
                "baseline_labelled": int(n.pb.n[0, i]),
                "canary_accuracy": _num(n.pc.mean[0, i]),
                "baseline_accuracy": _num(n.pb.mean[0, i]),
                "diff": _num(est.period_diff[0, i]),
                "se": _num(math.sqrt(v)) if math.isfinite(v) else None,
            }
        )
    return out


def _num(x: Any) -> float | None:
    """A finite float, or None (JSON has no infinity)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _metric_totals(policy: Policy, role: str, arm: ArmObservation, obs: Observations) -> MetricTotals:
    """A ranking metric's totals over an arm's closed exposures (users' and anonymous): the anonymous
    exposures' squared values are the arm's less its users' (from their clicks per position)."""
    metric, k = policy.decision_metric, policy.metric_k
    pooled = metric_sums(metric, arm.ranked, arm.click_positions, k)
    users = obs.users.arms.get(role) if obs.users is not None else None
    users_sq = 0.0 if users is None else metric_sums(metric, 0, users.ranking.clicks, k).sum_sq
    return MetricTotals(pooled.n, pooled.sum, pooled.sum_sq - users_sq, unit_variance(pooled))


def _user_unit(obs: Observations, policy: Policy, c: ArmObservation, b: ArmObservation) -> dict | None:
    """With users in both arms: the decision metric's difference's variance with users as clusters
    (predictions without a user each a cluster of one), for a ranking metric also its requests-as-units
    variance, users first assigned in this step per role, and per-arm users and requests for the
    record. None when no request named a user."""
    if obs.users is None:
        return None
    request_var = None
    if policy.decision_metric.ranking:
        totals = {
            role: _metric_totals(policy, role, arm, obs) for role, arm in (("canary", c), ("baseline", b))
        }
        est = obs.users.metric_diff(policy.decision_metric.value, policy.metric_k, totals)
        request_var = sum(t.unit_var / t.units if t.units else math.inf for t in totals.values())
    else:
        est = obs.users.accuracy_diff(
            {"canary": (c.labelled, c.correct), "baseline": (b.labelled, b.correct)}
        )
    if est is None:
        return None
    new = obs.users.new_users()
    return {
        "accuracy_var": float(est[1]),
        "request_var": request_var,
        "new_users": new if sum(new.values()) else {},
        "arms": {
            role: {"users": arm.users, "requests": arm.requests, "new_users": arm.new_users}
            for role, arm in obs.users.arms.items()
        },
    }
