"""Ranking metrics of `/recommend` from its clicks: what a policy may decide on instead of accuracy.

A `/recommend` answer is an exposure of its served list (item ids in served order, the top k). A click,
sent to `/feedback` with the item and its position as served (1 = first), is the request's positive
outcome when it arrives within the attribution window, like any label (docs/labels.md). Each closed
exposure then has one value per metric, every one bounded in [0, 1]:

- `ctr_at_k`: 1 if the click was at position k or better, else 0 (click-through at k);
- `mrr`: 1 / position of the click, 0 without one (its mean is the mean reciprocal rank);
- `ndcg`: 1 / log2(1 + position), 0 without one: NDCG with one relevant item (the clicked one), whose
  ideal DCG is 1.

The aggregates keep, per bucket, the exposures closed (`LabelFacts.ranked`) and the clicks' positions
as counts per position (`LabelFacts.click_positions`), which merge by addition; every metric above, for
any k, and the sums of its squares are computed from those counts. Pure: no I/O.

The sequential test (policy.py) runs on a metric's mean over the exposures as it runs on accuracy's over
the labelled, per ramp step (strata.py). Each step's variance of the mean is the arm's pooled
per-exposure sample variance (from the sums and sums of squares, with one pseudo-exposure at 0 and one at
1 so that a handful of exposures without a click cannot claim a variance of 0) over the step's exposures:
for `ctr_at_k` that is the Bernoulli p(1 - p) accuracy uses; for `mrr` and `ndcg`, whose values spread
less than a 0/1 outcome of the same mean, it is smaller, and the test needs fewer exposures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from control_plane.analysis import strata
from control_plane.analysis.aggregates import SparseCounts
from control_plane.analysis.types import ArmObservation

MAX_POSITION = 1000  # bentos/schemas.py: MAX_CANDIDATES, the longest list a /recommend can serve


class Metric(StrEnum):
    """What a rollout's policy decides on."""

    ACCURACY = "accuracy"  # /predict and /recommend: (score >= 0.5) == outcome, per labelled prediction
    CTR_AT_K = "ctr_at_k"  # /recommend: click at position <= metric_k, per exposure
    MRR = "mrr"  # /recommend: reciprocal rank of the click, per exposure
    NDCG = "ndcg"  # /recommend: 1 / log2(1 + position of the click), per exposure

    @property
    def ranking(self) -> bool:
        return self is not Metric.ACCURACY

    def label(self, k: int) -> str:
        """The metric's name in sentences: 'accuracy', 'CTR@5', 'MRR', 'NDCG'."""
        return {
            Metric.ACCURACY: "accuracy",
            Metric.CTR_AT_K: f"CTR@{k}",
            Metric.MRR: "MRR",
            Metric.NDCG: "NDCG",
        }[self]


def gain(metric: Metric, positions: np.ndarray, k: int) -> np.ndarray:
    """Each click position's value under a ranking metric (positions 1-based)."""
    pos = np.asarray(positions, dtype=float)
    if metric is Metric.CTR_AT_K:
        return (pos <= k).astype(float)
    if metric is Metric.MRR:
        return 1.0 / pos
    if metric is Metric.NDCG:
        return 1.0 / np.log2(1.0 + pos)
    raise ValueError(f"{metric} is not a ranking metric")


@dataclass(frozen=True)
class MetricSums:
    """A ranking metric over closed exposures: how many, the sum of their values and of their squares."""

    n: int
    sum: float
    sum_sq: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The per-exposure sample variance (population form)."""
        if not self.n:
            return None
        m = self.sum / self.n
        return max(self.sum_sq / self.n - m * m, 0.0)


def metric_sums(metric: Metric, ranked: int, click_positions: SparseCounts, k: int) -> MetricSums:
    """The metric's sums over `ranked` exposures whose clicks fell at `click_positions` (counts per
    position); exposures without a click count 0."""
    values = gain(metric, click_positions.bins, k) if len(click_positions.bins) else np.zeros(0)
    counts = click_positions.counts.astype(float)
    return MetricSums(int(ranked), float((values * counts).sum()), float((values * values * counts).sum()))


def on_metric(arm: ArmObservation, metric: Metric, k: int) -> ArmObservation:
    """The arm as the decision rules read it: for a ranking metric, `labelled` becomes its closed
    exposures and `correct` the metric's sum over them (pooled and per period), so the accuracy
    machinery (strata, sequential tests) runs on the metric unchanged."""
    if not metric.ranking:
        return arm
    periods = tuple(
        dataclasses.replace(
            p, labelled=p.ranked, correct=metric_sums(metric, p.ranked, p.click_positions, k).sum
        )
        for p in arm.periods
    )
    sums = metric_sums(metric, arm.ranked, arm.click_positions, k)
    return dataclasses.replace(arm, labelled=sums.n, correct=sums.sum, periods=periods)


def unit_variance(pooled: MetricSums) -> float:
    """The per-exposure variance the request-level test takes: the pooled sample variance with one
    pseudo-exposure at 0 and one at 1 (module docstring)."""
    m = (pooled.sum + 1.0) / (pooled.n + 2.0)
    return (pooled.sum_sq + 1.0) / (pooled.n + 2.0) - m * m


def metric_periods(arm: ArmObservation, metric: Metric, k: int) -> strata.ArmPeriods:
    """One arm's per-period means of a ranking metric and their variances, shape (1, periods); one
    period of the pooled sums if the arm was not read per period (strata.proportion_periods' shape)."""
    parts = arm.periods or (arm,)
    sums = [metric_sums(metric, p.ranked, p.click_positions, k) for p in parts]
    unit_var = unit_variance(metric_sums(metric, arm.ranked, arm.click_positions, k))
    n = np.asarray([[s.n for s in sums]], dtype=float)
    total = np.asarray([[s.sum for s in sums]], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        var = np.where(n >= strata.MIN_PERIOD_LABELS, unit_var / np.maximum(n, 1), np.inf)
    return strata.ArmPeriods(n, mean, var)


DEFAULT_K = 10  # the k shown for CTR@k where no policy names one (the API's window, /metrics)


@dataclass(frozen=True)
class RankingSummary:
    """An arm's ranking metrics over its closed /recommend exposures (None without exposures)."""

    exposures: int
    clicks: int  # clicks within the window, with their position
    k: int
    ctr_at_k: float | None
    mrr: float | None
    ndcg: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def ranking_summary(ranked: int, click_positions: SparseCounts, k: int = DEFAULT_K) -> RankingSummary:
    def mean(metric: Metric) -> float | None:
        value = metric_sums(metric, ranked, click_positions, k).mean
        return None if value is None else round(value, 6)

    return RankingSummary(
        exposures=int(ranked),
        clicks=click_positions.total,
        k=k,
        ctr_at_k=mean(Metric.CTR_AT_K),
        mrr=mean(Metric.MRR),
        ndcg=mean(Metric.NDCG),
    )
