"""Ramp-aware estimation, the novelty check and the router-count loss check, in decide() and below it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from control_plane.analysis import srm, strata
from control_plane.analysis.aggregates import BUCKET_S, label_facts, outcomes, request_facts
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Policy
from control_plane.analysis.types import (
    Action,
    ArmObservation,
    Observations,
    PeriodCounts,
    Phase,
    RolloutState,
)
from control_plane.metrics_source import MemoryMetricsSource
from control_plane.observations import ramp_periods, read_observations
from tests.unit.test_decide import latencies

SEQ = Policy()
HOUR = 3600.0
WEIGHTS = ({"baseline": 85, "canary": 10, "control": 5}, {"baseline": 70, "canary": 25, "control": 5})
LAST = {"baseline": 45, "canary": 50, "control": 5}


def arm_in_periods(cells: list[tuple[int, float]], error_rate: float = 0.005) -> ArmObservation:
    """An arm whose labelled predictions come per period as (count, accuracy)."""
    from control_plane.analysis.aggregates import LatencyHistogram

    periods = tuple(PeriodCounts(n, n, round(n * acc)) for n, acc in cells)
    n = sum(p.labelled for p in periods)
    return ArmObservation(
        version=1,
        requests=n,
        errors=round(n * error_rate),
        latency=LatencyHistogram.of(latencies(max(n, 1))),
        labelled=n,
        correct=sum(p.correct for p in periods),
        step_requests=periods[-1].requests,
        periods=periods,
    )


def obs_of(canary: ArmObservation, baseline: ArmObservation, weights=(*WEIGHTS, LAST)) -> Observations:
    """Three roles whose requests per step match that step's weights (labels may come from any share)."""
    arms = {"canary": canary, "baseline": baseline}
    requests = {r: [] for r in ("canary", "baseline", "control")}
    for c, b, w in zip(canary.periods, baseline.periods, weights, strict=True):
        total = 20 * (c.labelled + b.labelled)
        for r in requests:
            requests[r].append(round(total * w[r] / 100))

    def with_requests(a: ArmObservation, counts: list[int]) -> ArmObservation:
        periods = tuple(dataclasses.replace(p, requests=n) for p, n in zip(a.periods, counts, strict=True))
        return dataclasses.replace(a, requests=sum(counts), step_requests=counts[-1], periods=periods)

    out = {r: with_requests(a, requests[r]) for r, a in arms.items()}
    control = dataclasses.replace(canary, periods=tuple(PeriodCounts(0, 0, 0) for _ in weights))
    out["control"] = with_requests(control, requests["control"])
    out = {r: dataclasses.replace(a, errors=round(a.requests * 0.005)) for r, a in out.items()}
    starts = [i * HOUR for i in range(len(weights))]
    return Observations(
        now=len(weights) * HOUR,
        window_start=0.0,
        window_end=len(weights) * HOUR,
        arms=out,
        step_weights=dict(weights[-1]),
        periods=tuple(zip(starts, weights, strict=True)),
    )


def last_step_state() -> RolloutState:
    return RolloutState(Phase.PROGRESSING, 2, 50, 0.0, 2 * HOUR)


def test_a_trend_common_to_both_arms_does_not_bias_the_combined_difference():
    # accuracy rose from 70 % to 80 % for both arms while the canary's share grew: pooled, the canary
    # looks 8 points better; within each period it is exactly as good
    c = strata.proportion_periods([[700, 7200]], [[1000, 9000]])
    b = strata.proportion_periods([[6300, 800]], [[9000, 1000]])
    pooled = (700 + 7200) / 10_000 - (6300 + 800) / 10_000
    est = strata.combine(c, b)
    assert pooled == pytest.approx(0.08)
    assert float(est.diff[0]) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(est.period_diff, 0.0)


def test_one_period_gives_the_pooled_difference_and_an_empty_period_carries_no_weight():
    one = strata.combine(
        strata.proportion_periods([[800]], [[1000]]), strata.proportion_periods([[780]], [[1000]])
    )
    assert float(one.diff[0]) == pytest.approx(0.02)
    with_empty = strata.combine(
        strata.proportion_periods([[800, 0]], [[1000, 0]]), strata.proportion_periods([[780, 0]], [[1000, 0]])
    )
    assert float(with_empty.diff[0]) == pytest.approx(0.02) and float(with_empty.var[0]) == pytest.approx(
        float(one.var[0])
    )


def test_decide_does_not_promote_a_canary_that_only_looks_better_because_of_a_trend_during_the_ramp():
    # both arms gain 6 points from step 1 to step 3; the canary is +0.5 pt within each step
    canary = arm_in_periods([(3_000, 0.745), (8_000, 0.775), (40_000, 0.805)])
    baseline = arm_in_periods([(26_000, 0.74), (22_000, 0.77), (36_000, 0.80)])
    pooled = canary.accuracy - baseline.accuracy
    d = decide(last_step_state(), obs_of(canary, baseline), SEQ)
    assert pooled > 0.02, "pooled over the ramp the canary looks 2+ points better"
    assert d.action is not Action.PROMOTE, d.reason
    assert d.stats["accuracy"]["diff"] == pytest.approx(0.005, abs=1e-3)
    steps = d.stats["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [round(s["diff"], 3) for s in steps] == [0.005, 0.005, 0.005]
    assert steps[2]["weights"] == LAST and steps[0]["canary_labelled"] == 3_000


def test_a_gain_that_holds_overall_but_not_in_the_last_step_is_held_back_by_the_novelty_check():
    canary = arm_in_periods([(20_000, 0.83), (20_000, 0.82), (20_000, 0.785)])
    baseline = arm_in_periods([(60_000, 0.78), (50_000, 0.78), (20_000, 0.78)])
    d = decide(last_step_state(), obs_of(canary, baseline), SEQ)
    assert d.action is Action.HOLD and "novelty check blocks the promotion" in d.reason, d.reason
    assert d.stats["accuracy"]["p_superior"] <= SEQ.alpha, "the combined gain alone would promote"
    assert d.stats["novelty"]["passed"] is False and d.stats["novelty"]["verdict"].startswith("blocked")
    rule = {r.name: r for r in d.rules}["novelty_last_step"]
    assert rule.passed is False and rule.value > SEQ.alpha


def test_a_gain_that_holds_in_the_last_step_too_is_promoted_and_the_ledger_says_the_check_allowed_it():
    canary = arm_in_periods([(6_000, 0.81), (15_000, 0.81), (60_000, 0.81)])
    baseline = arm_in_periods([(50_000, 0.78), (40_000, 0.78), (54_000, 0.78)])
    d = decide(last_step_state(), obs_of(canary, baseline), SEQ)
    assert d.action is Action.PROMOTE, d.reason
    assert d.stats["novelty"]["verdict"].startswith("allowed") and d.stats["novelty"]["passed"] is True


def test_the_sample_ratio_check_pools_every_step_against_the_weights_in_force_then():
    # the canary is ~2.3 standard deviations short in each step: unremarkable alone, clear pooled
    observed = np.array([[[17_100, 1_900, 1_000], [14_140, 4_860, 1_000]]], dtype=float)
    weights = np.array([[[85, 10, 5], [70, 25, 5]]], dtype=float)
    stat, df, total, enough = srm.stratified_chi_square(observed, weights)
    assert bool(enough[0]) and int(df[0]) == 2 and total[0] == observed.sum()
    pooled = float(srm.stratified_p_values(observed, weights, 1e5, 0.001)[0][0])
    alone = [float(srm.srm_p_values(observed[0, i : i + 1], weights[0, i])[0]) for i in range(2)]
    assert min(alone) > 0.05 and pooled < 0.01
    one_step = srm.stratified_chi_square(observed[:, :1], weights[:, :1])[0]
    assert float(one_step[0]) == pytest.approx(float(srm.chi_square(observed[0, :1], weights[0, 0])[0][0]))


@pytest.mark.parametrize("lost, halts", [(0.0, False), (0.02, True)])
def test_requests_missing_from_the_log_are_caught_against_the_routers_own_counts(lost, halts):
    assigned = np.array([[30_000, 18_000, 2_000]])
    logged = assigned * np.array([1.0, 1.0 - lost, 1.0])
    p = float(srm.loss_p_values(assigned, np.round(logged), SEQ.srm_p)[0])
    assert (p < SEQ.srm_p) is halts
    # the logged split alone: 2 % fewer canary requests is well within chance at this size
    assert (
        srm.srm_p_value(
            {"baseline": 30_000, "canary": int(18_000 * (1 - lost)), "control": 2_000},
            {"baseline": 60, "canary": 36, "control": 4},
        )
        > SEQ.srm_p
    )


def test_decide_halts_when_the_router_assigned_requests_the_log_never_saw():
    canary = arm_in_periods([(2_000, 0.78), (5_000, 0.78), (20_000, 0.78)])
    baseline = arm_in_periods([(17_000, 0.78), (14_000, 0.78), (18_000, 0.78)])
    o = obs_of(canary, baseline)
    assigned = {r: a.requests for r, a in o.arms.items()}
    assigned["canary"] = round(assigned["canary"] / 0.98)
    d = decide(last_step_state(), dataclasses.replace(o, assigned=assigned), SEQ)
    assert d.action is Action.HALT and "missing from the log" in d.reason, d.reason
    assert d.stats["log_loss_check"]["p_always_valid"] < SEQ.srm_p


def test_read_observations_sums_each_step_by_the_predictions_own_bucket():
    source = MemoryMetricsSource()
    t0, step2 = 1_000_000_000.0, 1_000_000_600.0
    rows, keys, scores, labels = [], [], [], []
    for i in range(240):
        ts = t0 + i * 5.0 + 1.0
        role, version = ("canary", 2) if i % 4 == 0 else ("baseline", 1)
        rows.append((f"r{i}", ts, version, role, "weighted", "predict", None, 0.9, 20.0, 200))
        keys.append((int(ts // BUCKET_S * BUCKET_S), version, role, "weighted", "predict"))
        scores.append(0.9)
        labels.append(ts + 1.0 if (ts < step2) == (role == "canary") else np.nan)
    source.add_requests(request_facts(rows))
    pred = np.array([r[1] for r in rows])
    label_ts = np.array(labels)
    label = np.where(np.isnan(label_ts), np.nan, 1.0)
    source.add_labels(300.0, label_facts(keys, np.array(scores), outcomes(pred, label, label_ts, 300.0)))
    history = [(t0, 10), (step2, 25)]
    obs = read_observations(
        source,
        versions={"baseline": 1, "canary": 2},
        since=t0,
        step_since=step2,
        now=t0 + 1200 + 300,
        label_window_s=300.0,
        step_weights={"baseline": 75, "canary": 25},
        periods=ramp_periods(history, t0, 0),
    )
    c, b = obs.arms["canary"], obs.arms["baseline"]
    assert [p.requests for p in c.periods] == [30, 30] and sum(p.requests for p in b.periods) == b.requests
    assert [p.labelled for p in c.periods] == [30, 30]
    assert [p.correct for p in c.periods] == [30, 0] and [p.correct for p in b.periods] == [0, 90]
    assert obs.periods[1] == (step2, {"baseline": 75, "canary": 25})
    # with the second step's weights surely in force only 100 s after its advance, the sample-ratio
    # check counts that step's requests from then on; the estimates still count them all
    late = read_observations(
        source,
        versions={"baseline": 1, "canary": 2},
        since=t0,
        step_since=step2 + 100,
        now=t0 + 1200 + 300,
        label_window_s=300.0,
        step_weights={"baseline": 75, "canary": 25},
        periods=ramp_periods(history, t0, 0),
        period_settled=[None, step2 + 100],
    ).arms["canary"]
    assert [p.requests for p in late.periods] == [30, 30]
    assert [p.srm_requests for p in late.periods] == [30, 25]  # 20 of its buckets, 1 in 4 the canary's
