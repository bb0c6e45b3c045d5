"""The shadow phase's decision: the candidate answers mirrored copies of live requests that nobody sees.

Traefik copies `shadow_percent` of the weighted requests to the candidate (route = shadow) while the
baseline answers all of them. The candidate's errors and latencies on the copies are compared with the
baseline's on the live requests of the same window, with the same always-valid tests the canary steps
use: a candidate that errors or slows down is rolled back here, before any user is answered by it.

When the copies carry the gateway's pair key, the evidence also holds the paired differences on the
identical requests (analysis/paired.py): score drift, top-k overlap, latency and errors per pair, and
the always-valid paired test of the accuracy difference once labels close. They are reported, not
gated on: the gate above decides as without them.
"""

from __future__ import annotations

import math

import numpy as np

from control_plane.analysis import guardrails, paired
from control_plane.analysis.aggregates import SCORE_BINS, SparseCounts
from control_plane.analysis.policy import Policy
from control_plane.analysis.types import (
    Action,
    ArmObservation,
    Decision,
    Observations,
    RolloutState,
    RuleOutcome,
)


def decide_shadow(state: RolloutState, obs: Observations, policy: Policy) -> Decision:
    """One evaluation of a rollout in its shadow phase; `obs.arms` holds "canary" (its shadow copies)
    and "baseline" (its live weighted requests)."""
    c, b = obs.arms.get("canary"), obs.arms.get("baseline")
    if c is None or b is None:
        return Decision(Action.NO_DATA, "no observations for the shadow or the baseline", 0)
    err = {
        k: float(np.asarray(v).reshape(-1)[0])
        for k, v in guardrails.rate_tests(
            c.errors, c.requests, b.errors, b.requests, policy.error_margin, policy.alpha, policy.planned_n
        ).items()
    }
    lat = guardrails.p99_ratio(
        c.latency,
        b.latency,
        policy.alpha,
        policy.planned_n,
        policy.harm_expected_n,
        harm_alpha=policy.harm_alpha,
    )
    elapsed = obs.now - state.started_at
    shadow_elapsed = obs.now - state.step_started_at
    enough_requests = min(c.requests, b.requests) >= policy.min_requests_per_arm
    enough_latency = min(c.latency.count, b.latency.count) >= policy.min_latency_samples
    err_harm = enough_requests and err["p_harm"] <= policy.harm_alpha
    lat_harm = enough_latency and lat["lower"] > policy.p99_ratio
    # A safety gate, not the efficacy test: the harm tests did not fire and the point estimates are
    # within the margins (the canary steps then show non-inferiority on live traffic).
    err_ok = enough_requests and err["diff"] <= policy.error_margin
    lat_ok = enough_latency and math.isfinite(lat["ratio"]) and lat["ratio"] <= policy.p99_ratio
    long_enough = shadow_elapsed >= policy.shadow_min_duration_s

    errs = (
        f"shadow errors {100 * c.error_rate:.2f}% vs baseline {100 * b.error_rate:.2f}% "
        f"({100 * err['diff']:+.1f} pts) on {c.requests} mirrored / {b.requests} live requests"
    )
    p99 = f"shadow p99 {lat['p99_canary']:.1f} ms vs {lat['p99_baseline']:.1f} ms (ratio {_ratio(lat['ratio'])})"
    first = policy.steps[0]
    if err_harm:
        action, weight = Action.ROLLBACK, 0
        reason = (
            f"{errs}: confidently worse than the {100 * policy.error_margin:.1f} pts margin "
            f"(p={err['p_harm']:.2g}); stopped in the shadow phase, no user was answered by it"
        )
    elif lat_harm:
        action, weight = Action.ROLLBACK, 0
        reason = (
            f"{p99}: confidently above {policy.p99_ratio:.2f} (always-valid lower bound "
            f"{_ratio(lat['lower'])}); stopped in the shadow phase, no user was answered by it"
        )
    elif elapsed >= policy.max_duration_s:
        action, weight = Action.INCONCLUSIVE, 0
        reason = f"no decision in the shadow phase after {elapsed / 3600:.1f} h: inconclusive; {errs}; {p99}"
    elif not (enough_requests and enough_latency):
        action, weight = Action.HOLD, 0
        reason = (
            f"shadow: waiting for data: requests {c.requests}/{b.requests} (shadow/baseline, need "
            f"{policy.min_requests_per_arm}), latencies {c.latency.count}/{b.latency.count} "
            f"(need {policy.min_latency_samples})"
        )
    elif err_ok and lat_ok and long_enough:
        action, weight = Action.ADVANCE, first
        reason = (
            f"shadow phase passed: {errs}, within the {100 * policy.error_margin:.1f} pts margin and no harm "
            f"(p={err['p_harm']:.2g}); {p99}: giving it {first}%"
        )
    else:
        action, weight = Action.HOLD, 0
        missing = [
            *(
                []
                if long_enough
                else [f"{shadow_elapsed:.0f} s of the {policy.shadow_min_duration_s:.0f} s minimum"]
            ),
            *([] if err_ok else [f"error diff above the {100 * policy.error_margin:.1f} pts margin"]),
            *([] if lat_ok else [f"p99 ratio {_ratio(lat['ratio'])} above {policy.p99_ratio:.2f}"]),
        ]
        reason = f"shadow: {errs}; {p99}; holding: {', '.join(missing)}"
    rules = (
        _rule(
            "shadow_error_harm",
            err["p_harm"],
            policy.harm_alpha,
            (not err_harm) if enough_requests else None,
            "always-valid p that the shadow's errors exceed the margin",
        ),
        _rule(
            "shadow_latency_harm",
            lat["lower"],
            policy.p99_ratio,
            (not lat_harm) if enough_latency else None,
            "always-valid lower bound of the shadow's p99 over the baseline's",
        ),
        _rule(
            "shadow_error_noninferiority",
            err["p_noninferior"],
            policy.alpha,
            err_ok if enough_requests else None,
            "always-valid p that the shadow's errors are within the margin",
        ),
        _rule(
            "shadow_p99_ratio",
            lat["ratio"],
            policy.p99_ratio,
            lat_ok if enough_latency else None,
            "shadow p99 over baseline p99 on the same window",
        ),
        _rule(
            "shadow_duration",
            shadow_elapsed,
            policy.shadow_min_duration_s,
            long_enough,
            "seconds in the shadow phase",
        ),
    )
    stats = {
        "policy": policy.name,
        "phase": "shadow",
        "cause": "shadow_" + str(action),
        "window_start": obs.window_start,
        "window_end": obs.window_end,
        "elapsed_s": elapsed,
        "step_elapsed_s": shadow_elapsed,
        "shadow": {
            "percent": policy.shadow_percent,
            "requests": {"shadow": c.requests, "baseline": b.requests},
            "errors": {
                "shadow": c.error_rate,
                "baseline": b.error_rate,
                **err,
                "margin": policy.error_margin,
            },
            "latency": {**{k: _num(v) for k, v in lat.items()}, "max_ratio": policy.p99_ratio},
            "scores": score_drift(c.scores, b.scores),
            "paired": None
            if obs.pairs is None
            else paired.summary(obs.pairs, policy.alpha, policy.planned_n),
        },
        "samples": {role: _sample(arm) for role, arm in obs.arms.items()},
    }
    if obs.pairs is not None and obs.pairs.pairs:
        reason += "; " + paired_line(stats["shadow"]["paired"])
    return Decision(action, reason, weight, rules, stats)


def paired_line(p: dict) -> str:
    """The paired numbers in a sentence, for the decision's reason."""
    acc = p["accuracy"]
    parts = [f"paired on {p['pairs']} identical requests"]
    if p["score"]["mean_abs_diff"] is not None:
        parts.append(
            f"score |diff| {p['score']['mean_abs_diff']:.3f} (mean diff {p['score']['mean_diff']:+.3f})"
        )
    if p["top_k_overlap"]["mean"] is not None:
        parts.append(f"top-k overlap {100 * p['top_k_overlap']['mean']:.0f}%")
    if p["latency_ms"]["mean_diff"] is not None:
        parts.append(f"latency {p['latency_ms']['mean_diff']:+.1f} ms")
    e = p["errors"]
    parts.append(
        f"errors shadow only {e['shadow_only']}, baseline only {e['baseline_only']}, both {e['both']}"
    )
    if acc["lower"] is not None:
        parts.append(
            f"accuracy diff {100 * acc['mean']:+.2f} pts on {acc['n']} labelled pairs, always-valid "
            f"{100 * (1 - acc['alpha']):.0f}% interval [{100 * acc['lower']:+.2f}, {100 * acc['upper']:+.2f}]"
        )
    elif acc["n"]:
        parts.append(f"accuracy diff {100 * acc['mean']:+.2f} pts on {acc['n']} labelled pairs")
    return ", ".join(parts)


def score_drift(shadow: SparseCounts, baseline: SparseCounts) -> dict:
    """How the shadow's score distribution differs from the baseline's on the same window's requests:
    the difference of the mean scores and the largest gap between the two distribution functions
    (Kolmogorov-Smirnov), both from the score bins the label job keeps (bin width 1/SCORE_BINS).
    Unpaired: the copies are the same requests, but the rows are not matched one to one."""
    n_s, n_b = shadow.total, baseline.total
    out = {"shadow_n": n_s, "baseline_n": n_b, "shadow_mean": None, "baseline_mean": None}
    if not n_s or not n_b:
        return {**out, "mean_diff": None, "ks": None}
    centres = (np.arange(SCORE_BINS) + 0.5) / SCORE_BINS
    hist_s, hist_b = np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)
    np.add.at(hist_s, shadow.bins, shadow.counts)
    np.add.at(hist_b, baseline.bins, baseline.counts)
    mean_s, mean_b = float(centres @ hist_s / n_s), float(centres @ hist_b / n_b)
    ks = float(np.max(np.abs(np.cumsum(hist_s) / n_s - np.cumsum(hist_b) / n_b)))
    return {**out, "shadow_mean": mean_s, "baseline_mean": mean_b, "mean_diff": mean_s - mean_b, "ks": ks}


def _sample(arm: ArmObservation) -> dict:
    return {"requests": arm.requests, "errors": arm.errors, "latencies": arm.latency.count}


def _rule(name: str, value: float, threshold: float, passed: bool | None, detail: str) -> RuleOutcome:
    return RuleOutcome(name, _num(value), _num(threshold), None if passed is None else bool(passed), detail)


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"
