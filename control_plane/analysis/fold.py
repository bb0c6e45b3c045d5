"""Aggregate buckets folded into one arm's window: totals and per-period sums (the ramp-aware input).

The worker reads its buckets from a MetricsSource and the simulation makes its own; both fold them here,
so a window counts alike in both. A bucket counts when it lies wholly in [since, until) (its start at or
after `since`, its end at or before `until`); it belongs to the period in force at its start; its requests
are *steady* (the sample-ratio check's) when the bucket starts once the period's weights were surely in
force and ends before the next period began. Pure and vectorised: values carry the buckets on the last
axis and any leading axes (the simulation's replications); sums over disjoint sets of buckets add up, so
a window may be folded at once (the worker) or bucket by bucket as they come in (the simulation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from control_plane.analysis.aggregates import BUCKET_S, SparseCounts


@dataclass(frozen=True)
class Periods:
    """A ramp's periods of constant weights: their starts (oldest first) and when each one's weights were
    surely in force (its start when not known). Shape (periods,), or (..., periods) when every row (a
    simulated replication) has its own; a period not begun yet starts at +inf."""

    starts: np.ndarray
    settled: np.ndarray

    @classmethod
    def of(cls, starts: Sequence[float], settled: Sequence[float | None] = ()) -> Periods:
        s = np.asarray(list(starts), dtype=float)
        known = [(settled[i] if i < len(settled) else None) for i in range(len(s))]
        return cls(s, np.array([s[i] if k is None else k for i, k in enumerate(known)], dtype=float))

    def __len__(self) -> int:
        return self.starts.shape[-1]


@dataclass(frozen=True)
class RequestSums:
    """Requests and errors of the buckets in a window, in all and per period (last axis)."""

    requests: np.ndarray
    errors: np.ndarray
    period_requests: np.ndarray
    period_steady: np.ndarray  # of those, in buckets where the period's weights were surely in force

    def __add__(self, other: RequestSums) -> RequestSums:
        return RequestSums(
            self.requests + other.requests,
            self.errors + other.errors,
            self.period_requests + other.period_requests,
            self.period_steady + other.period_steady,
        )


@dataclass(frozen=True)
class LabelSums:
    """Closed (labelled) predictions and the correct ones among them, in all and per period (last axis)."""

    labelled: np.ndarray
    correct: np.ndarray
    period_labelled: np.ndarray
    period_correct: np.ndarray

    def __add__(self, other: LabelSums) -> LabelSums:
        return LabelSums(
            self.labelled + other.labelled,
            self.correct + other.correct,
            self.period_labelled + other.period_labelled,
            self.period_correct + other.period_correct,
        )


@dataclass(frozen=True)
class RankingSums:
    """Closed /recommend exposures and their clicks' positions (counts per position), per period."""

    period_ranked: tuple[int, ...]
    period_click_positions: tuple[SparseCounts, ...]


def inside(starts: np.ndarray, since: float, until: float) -> np.ndarray:
    """Whether each bucket lies wholly in [since, until)."""
    s = np.asarray(starts, dtype=float)
    return (s >= since) & (s + BUCKET_S <= until)


def totals(starts: np.ndarray, values: np.ndarray, *, since: float, until: float) -> np.ndarray:
    """The sum of the values (..., buckets) of the buckets wholly in [since, until): a window's total."""
    return np.asarray(values, dtype=float) @ inside(starts, since, until).astype(float)


def period_of(starts: np.ndarray, periods: Periods) -> np.ndarray:
    """The period in force at each bucket's start (the first one for buckets before it began), shape
    (..., buckets) for periods of shape (..., periods)."""
    s = np.asarray(starts, dtype=float)
    return np.maximum((periods.starts[..., None, :] <= s[:, None]).sum(axis=-1) - 1, 0)


def _membership(starts: np.ndarray, periods: Periods, mask: np.ndarray) -> np.ndarray:
    """(..., buckets, periods): whether a counted bucket belongs to the period."""
    return (period_of(starts, periods)[..., None] == np.arange(len(periods))) & mask[:, None]


def _sum(values: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Per period (last axis): the values (..., buckets) of the member buckets (..., buckets, periods)."""
    return (np.asarray(values, dtype=float)[..., None, :] @ member)[..., 0, :]


def fold_requests(
    starts: np.ndarray,
    requests: np.ndarray,
    errors: np.ndarray,
    *,
    since: float,
    until: float,
    periods: Periods,
) -> RequestSums:
    """Requests and errors of the buckets wholly in [since, until), in all and per period (values: shape
    (..., buckets); periods: broadcastable to (..., periods))."""
    starts = np.asarray(starts, dtype=float)
    mask = inside(starts, since, until)
    member = _membership(starts, periods, mask)
    ends = np.concatenate([periods.starts[..., 1:], np.full(periods.starts.shape[:-1] + (1,), np.inf)], -1)
    s = starts[:, None]
    steady = member & (s >= periods.settled[..., None, :]) & (s + BUCKET_S <= ends[..., None, :])
    return RequestSums(
        totals(starts, requests, since=since, until=until),
        totals(starts, errors, since=since, until=until),
        _sum(requests, member.astype(float)),
        _sum(requests, steady.astype(float)),
    )


def fold_labels(
    starts: np.ndarray,
    labelled: np.ndarray,
    correct: np.ndarray,
    *,
    since: float,
    until: float,
    periods: Periods,
) -> LabelSums:
    """Closed predictions and the correct ones of the buckets wholly in [since, until) (`until`: where
    attribution windows have closed), in all and per period."""
    starts = np.asarray(starts, dtype=float)
    mask = inside(starts, since, until)
    member = _membership(starts, periods, mask).astype(float)
    n, k = np.asarray(labelled, dtype=float), np.asarray(correct, dtype=float)
    return LabelSums(
        totals(starts, n, since=since, until=until),
        totals(starts, k, since=since, until=until),
        _sum(n, member),
        _sum(k, member),
    )


def fold_ranking(
    starts: np.ndarray,
    ranked: Sequence[int],
    click_positions: Sequence[SparseCounts],
    *,
    since: float,
    until: float,
    periods: Periods,
) -> RankingSums:
    """The ranking metrics' sums of the buckets wholly in [since, until) (`until`: where attribution
    windows have closed), per period: their closed exposures and their clicks' positions. One row of
    buckets (no leading axes): click positions are merged, not added as arrays."""
    starts = np.asarray(starts, dtype=float)
    period_ranked = [0] * len(periods)
    period_clicks = [SparseCounts() for _ in range(len(periods))]
    counted, period = inside(starts, since, until), period_of(starts, periods)
    for ok, i, n, clicks in zip(counted, period, ranked, click_positions, strict=True):
        if ok and n:
            period_ranked[i] += n
            period_clicks[i] = period_clicks[i].merge(clicks)
    return RankingSums(tuple(period_ranked), tuple(period_clicks))
