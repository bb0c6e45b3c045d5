"""A simulated rollout through the production path: rows → aggregates → observations → decide().

`recsys simulate --through-aggregates N` runs N replications of each scenario this way, beside the
vectorised simulation (analysis/simulate.py): every minute's requests become prediction-log rows whose
facts are added with the writer's function (`request_facts`), their labels arrive after a delay and are
counted with the label job's function (`label_facts`, `outcomes`) once their attribution window closes,
and each evaluation reads a MemoryMetricsSource through `observations.read_observations`, the builder the
worker uses, before calling decide(). Slower than the vectorised run, so it takes fewer replications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from control_plane.analysis.aggregates import BUCKET_S, label_facts, outcomes, request_facts
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Policy
from control_plane.analysis.simulate import Scenario, Traffic
from control_plane.analysis.types import Action, Phase, RolloutState
from control_plane.metrics_source import MemoryMetricsSource
from control_plane.observations import ramp_periods, read_observations

VERSIONS = {"baseline": 1, "canary": 2, "control": 3}
T0 = 1_000_000_000.0  # on a bucket


@dataclass(frozen=True)
class ReplayOutcome:
    action: str
    minutes: float


def _minute(rng, scenario: Scenario, traffic: Traffic, t: float, weights: dict[str, int]):
    """One minute of requests as prediction-log rows, and (prediction time, score, outcome, label time)."""
    rows, labels = [], []
    n = rng.poisson(traffic.rate_per_s * traffic.eval_interval_s)
    roles = rng.choice(list(weights), size=n, p=np.array(list(weights.values())) / sum(weights.values()))
    ts = t + np.sort(rng.random(n)) * traffic.eval_interval_s
    for i, (role, when) in enumerate(zip(roles, ts, strict=True)):
        canary = role == "canary"
        if canary and rng.random() < scenario.srm_loss:
            continue  # never logged
        err = rng.random() < traffic.base_error_rate + (scenario.error_diff if canary else 0.0)
        lat = float(rng.lognormal(math.log(traffic.latency_median_ms), traffic.latency_sigma))
        lat *= scenario.latency_ratio if canary else 1.0
        score = float(rng.random())
        base = traffic.base_accuracy if scenario.base_accuracy is None else scenario.base_accuracy
        elapsed = float(when) - T0
        accuracy = base + scenario.drift_per_h * elapsed / 3600.0
        right = rng.random() < accuracy + (float(scenario.lift_at(elapsed)) if canary else 0.0)
        clicked = int(score >= 0.5) if right else int(score < 0.5)
        rid = f"{t}-{i}"
        rows.append(
            (
                rid,
                float(when),
                VERSIONS[role],
                role,
                "weighted",
                "predict",
                None,
                None if err else score,
                lat,
                503 if err else 200,
            )
        )
        if not err:
            # a click arrives after the label delay; a non-click never does
            labels.append(
                (
                    float(when),
                    score,
                    clicked,
                    float(when) + traffic.label_delay_s * 0.5 if clicked else math.nan,
                )
            )
    return rows, labels


def replay(scenario: Scenario, policy: Policy, traffic: Traffic, seed: int) -> ReplayOutcome:
    """One rollout, minute by minute, until decide() ends it or its time limit."""
    rng = np.random.default_rng(seed)
    source = MemoryMetricsSource()
    window_s = traffic.label_delay_s
    step, evaluations, running_p = 0, 0, {}
    weight = policy.steps[0]
    started = step_started = T0
    history = [(T0, weight)]  # what the ledger's start and advance rows hold
    pending: list[tuple] = []
    closed_until = T0
    t = T0
    while True:
        weights = {
            "baseline": 100 - weight - traffic.control_weight,
            "canary": weight,
            "control": traffic.control_weight,
        }
        rows, labels = _minute(rng, scenario, traffic, t, weights)
        source.add_requests(request_facts(rows))
        pending += [
            (r[1], r[2], r[3], lab) for r, lab in zip([r for r in rows if r[9] < 500], labels, strict=True)
        ]
        t += traffic.eval_interval_s
        # the label job: every prediction whose window closed since the last run
        cutoff = math.floor((t - window_s) / BUCKET_S) * BUCKET_S
        done = [p for p in pending if closed_until <= p[0] < cutoff]
        pending = [p for p in pending if p[0] >= cutoff]
        closed_until = max(closed_until, cutoff)
        if done:
            pred_ts = np.array([p[0] for p in done])
            keys = [
                (int(ts // BUCKET_S * BUCKET_S), v, role, "weighted", "predict") for ts, v, role, _ in done
            ]
            scores = np.array([p[3][1] for p in done])
            label = np.array([1.0 if p[3][2] else math.nan for p in done])
            label_ts = np.array([p[3][3] for p in done])
            source.add_labels(
                window_s, label_facts(keys, scores, outcomes(pred_ts, label, label_ts, window_s))
            )
        obs = read_observations(
            source,
            versions=VERSIONS,
            since=started,
            step_since=step_started,
            now=t,
            label_window_s=window_s,
            step_weights=weights,
            periods=ramp_periods(history, started, traffic.control_weight),
        )
        state = RolloutState(Phase.PROGRESSING, step, weight, started, step_started, evaluations, running_p)
        decision = decide(state, obs, policy)
        evaluations += 1
        running_p = decision.stats.get("running_p_values", running_p)
        if decision.action in (Action.PROMOTE, Action.ROLLBACK, Action.HALT, Action.INCONCLUSIVE):
            return ReplayOutcome(decision.action.value, (t - started) / 60)
        if decision.action is Action.ADVANCE:
            step, weight, step_started = step + 1, decision.next_weight, t
            history.append((t, weight))


def replay_table(scenarios, policy: Policy, traffic: Traffic, reps: int, seed: int) -> str:
    """Per scenario: how often each ending happened over `reps` production-path replications."""
    lines = [
        f"## Through the aggregates and decide() ({policy.name}, {reps} replications a scenario)",
        "",
        "| scenario | promoted | rolled back | halted | inconclusive | median minutes |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for i, s in enumerate(scenarios):
        outs = [replay(s, policy, traffic, seed * 100_000 + i * 1000 + r) for r in range(reps)]

        def share(action: str, outs=outs) -> str:
            return f"{100 * sum(o.action == action for o in outs) / len(outs):.0f} %"

        minutes = float(np.median([o.minutes for o in outs]))
        lines.append(
            f"| {s.name} | {share('promote')} | {share('rollback')} | {share('halt')} | {share('inconclusive')} | {minutes:.0f} |"
        )
    return "\n".join(lines) + "\n"
