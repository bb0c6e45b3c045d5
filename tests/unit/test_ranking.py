"""Ranking metrics from click positions, their aggregates, the policy's decision metric, and decide() on it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from control_plane.analysis.aggregates import LabelFacts, SparseCounts, label_facts
from control_plane.analysis.decide import decide
from control_plane.analysis.policy import Policy
from control_plane.analysis.ranking import Metric, gain, metric_sums, on_metric, ranking_summary
from control_plane.analysis.types import Action, PeriodCounts
from tests.unit.test_decide import BIG_B, BIG_C, arm, observations, state


def positions(*ps: int) -> SparseCounts:
    return SparseCounts.of_bins(np.asarray(ps))


def test_each_metric_s_value_of_a_click_position():
    pos = np.array([1, 2, 4, 11])
    assert gain(Metric.MRR, pos, 10).tolist() == [1.0, 0.5, 0.25, 1 / 11]
    assert gain(Metric.CTR_AT_K, pos, 3).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert gain(Metric.NDCG, pos, 10).tolist() == pytest.approx(
        [1.0, 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(12)]
    )
    with pytest.raises(ValueError):
        gain(Metric.ACCURACY, pos, 10)


def test_sums_over_exposures_count_an_exposure_without_a_click_as_zero():
    clicks = positions(1, 1, 2, 5)  # 4 clicks among 10 exposures
    mrr = metric_sums(Metric.MRR, 10, clicks, 10)
    assert (mrr.n, mrr.sum, mrr.sum_sq) == (10, 2.7, 2 + 0.25 + 0.04)
    assert mrr.mean == pytest.approx(0.27)
    values = np.array([1, 1, 0.5, 0.2] + [0] * 6)
    assert mrr.variance == pytest.approx(values.var())
    ctr = metric_sums(Metric.CTR_AT_K, 10, clicks, 2)
    assert (ctr.sum, ctr.mean) == (3.0, 0.3)
    assert metric_sums(Metric.MRR, 0, SparseCounts(), 10).mean is None
    s = ranking_summary(10, clicks, k=1)
    assert (s.exposures, s.clicks, s.k, s.ctr_at_k, s.mrr) == (10, 4, 1, 0.2, 0.27)


def test_label_facts_keep_click_positions_of_recommend_requests_with_a_positive_outcome_only():
    keys = [(0, 1, "baseline", "weighted", "recommend")] * 4 + [(0, 1, "baseline", "weighted", "predict")] * 2
    scores = np.full(6, 0.7)
    outcome = np.array([1, 0, 1, 1, 1, 0])  # request 1 clicked after its window (outcome 0)
    click = np.array([3, 2, np.nan, 1, 1, np.nan])  # request 2: a plain label 1, no position
    facts = label_facts(keys, scores, outcome, click)
    rec, pred = facts[keys[0]], facts[keys[4]]
    assert (rec.closed, rec.ranked, rec.positives) == (4, 4, 3)
    assert rec.click_positions == positions(1, 3)
    assert (pred.closed, pred.ranked, pred.click_positions.total) == (2, 0, 0)
    merged = rec.merge(rec)
    assert merged.ranked == 8 and merged.click_positions == positions(1, 1, 3, 3)
    assert LabelFacts().merge(rec) == rec


def test_on_metric_puts_the_metric_where_the_rules_read_accuracy():
    a = dataclasses.replace(
        arm(100, 0.8),
        ranked=50,
        click_positions=positions(1, 2, 4),
        periods=(
            PeriodCounts(60, 60, 48, ranked=30, click_positions=positions(1)),
            PeriodCounts(40, 40, 32, ranked=20, click_positions=positions(2, 4)),
        ),
    )
    assert on_metric(a, Metric.ACCURACY, 10) is a
    m = on_metric(a, Metric.MRR, 10)
    assert (m.labelled, m.correct) == (50, 1.75) and m.accuracy == pytest.approx(0.035)
    assert [(p.labelled, p.correct) for p in m.periods] == [(30, 1.0), (20, 0.75)]
    assert (m.requests, m.errors) == (a.requests, a.errors)  # guardrails untouched
    c = on_metric(a, Metric.CTR_AT_K, 1)
    assert (c.labelled, c.correct) == (50, 1.0)


def test_the_policy_names_its_metric_and_refuses_an_unknown_one():
    assert Policy().metric == "accuracy" and Policy().decision_metric is Metric.ACCURACY
    p = Policy.from_dict({"metric": "ctr_at_k", "metric_k": 5})
    assert p.metric_label == "CTR@5" and Policy.from_dict(p.to_dict()) == p
    assert Policy.from_dict({"metric": "mrr"}).metric_label == "MRR"
    with pytest.raises(ValueError, match="policy field metric must be one of accuracy, ctr_at_k, mrr, ndcg"):
        Policy.from_dict({"metric": "auc"})
    for k in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match="policy field metric_k must be an integer from 1 to 1000"):
            Policy.from_dict({"metric": "ctr_at_k", "metric_k": k})


def ranked_arm(n: int, accuracy: float, mrr_clicks: dict[int, int]) -> object:
    """An arm whose every request is a /recommend exposure, with clicks at the given positions."""
    bins = np.repeat(list(mrr_clicks), list(mrr_clicks.values()))
    return dataclasses.replace(arm(n, accuracy), ranked=n, click_positions=SparseCounts.of_bins(bins))


def test_a_rollout_deciding_on_mrr_promotes_on_a_better_ranking_that_accuracy_cannot_see():
    # Equal accuracy; the canary puts the clicked item first more often: MRR 0.20 against 0.15.
    canary = ranked_arm(BIG_C, 0.78, {1: BIG_C // 10, 2: BIG_C // 5})
    baseline = ranked_arm(BIG_B, 0.78, {1: BIG_B // 20, 2: BIG_B // 5})
    obs = observations(canary, baseline, 50)
    by_accuracy = decide(state(), obs, Policy())
    assert by_accuracy.action is not Action.PROMOTE
    by_mrr = decide(state(), obs, Policy(metric="mrr", planning_accuracy=0.15, target_lift=0.02))
    assert by_mrr.action is Action.PROMOTE, by_mrr.reason
    assert "canary MRR +5.0 pts" in by_mrr.reason
    assert by_mrr.stats["metric"] == {"name": "mrr", "k": 10, "label": "MRR"}
    assert by_mrr.stats["accuracy"]["canary"] == pytest.approx(0.2)


def test_a_worse_ranking_is_rolled_back_on_its_metric():
    canary = ranked_arm(BIG_C, 0.80, {1: BIG_C // 20, 3: BIG_C // 10})
    baseline = ranked_arm(BIG_B, 0.78, {1: BIG_B // 10, 3: BIG_B // 10})
    d = decide(
        state(),
        observations(canary, baseline, 50),
        Policy(metric="ctr_at_k", metric_k=1, planning_accuracy=0.1),
    )
    assert d.action is Action.ROLLBACK and "CTR@1" in d.reason


def test_a_ranking_metric_s_variance_comes_from_its_sums_of_squares():
    from control_plane.analysis import strata
    from control_plane.analysis.ranking import metric_periods

    clicks = {1: 100, 2: 200, 5: 100}  # among 1,000 exposures
    a = ranked_arm(1000, 0.8, clicks)
    values = np.concatenate([np.repeat([1.0, 0.5, 0.2], [100, 200, 100]), np.zeros(600), [0.0, 1.0]])
    mrr = metric_periods(a, Metric.MRR, 10)
    assert mrr.mean[0, 0] == pytest.approx(0.22)
    assert mrr.var[0, 0] == pytest.approx(values.var() / 1000)
    bernoulli = strata.proportion_periods([[220.0]], [[1000.0]]).var[0, 0]
    assert mrr.var[0, 0] < 0.75 * bernoulli  # MRR's values spread less than clicks of the same mean
    ctr = metric_periods(a, Metric.CTR_AT_K, 10)  # 0/1 values: the Bernoulli variance, as for accuracy
    assert ctr.var[0, 0] == pytest.approx(0.4 * 0.6 / 1000, rel=0.01)
    none = metric_periods(ranked_arm(5, 0.8, {}), Metric.MRR, 10)  # no click yet: not a variance of 0
    assert none.mean[0, 0] == 0 and none.var[0, 0] > 0.01
    stepped = dataclasses.replace(
        a,
        periods=(
            PeriodCounts(600, 600, 0, ranked=600, click_positions=positions(*[1] * 60)),
            PeriodCounts(400, 400, 0, ranked=0),
        ),
    )
    per_step = metric_periods(stepped, Metric.MRR, 10)
    assert per_step.mean[0, 0] == pytest.approx(0.1) and np.isnan(per_step.mean[0, 1])
    assert per_step.var[0, 0] == pytest.approx(mrr.var[0, 0] * 1000 / 600) and per_step.var[0, 1] == np.inf
