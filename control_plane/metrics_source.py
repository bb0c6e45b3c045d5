"""Where an evaluation's numbers come from: one small interface over the bucketed aggregates.

Every read that decides or shows something goes through a `MetricsSource` (as Flagger's metric
providers do): the SQL tables today (`queries.SqlMetricsSource`), an in-memory store for unit tests and
the simulation; a column store or Prometheus could answer the same two questions tomorrow without
`decide()` or the observation builder (`observations.py`) knowing.

Both questions take the buckets lying wholly in [since, until) and sum them per group: `by` maps a
bucket's key to its group (None: one group, the total; `lambda k: k`: every bucket on its own; a ramp
step, a chart bucket or a role: per period or per series).

A source that can pair a shadow's copies with the baseline's answers (`queries.SqlMetricsSource`) also
answers `pairs(PairQuery)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from control_plane.analysis.aggregates import (
    BUCKET_S,
    BucketKey,
    LabelFacts,
    LatencyHistogram,
    RequestFacts,
    SparseCounts,
    merge_into,
)

WEIGHTED = "weighted"
SHADOW_ROUTE = "shadow"  # a shadow candidate's answers to Traefik's mirrored copies (bentos/http.py)

GroupBy = Callable[[BucketKey], Hashable] | None


class MetricsSource(Protocol):
    def requests(
        self,
        since: float,
        until: float,
        *,
        by: GroupBy = None,
        version: int | None = None,
        route: str | None = WEIGHTED,
    ) -> dict[Hashable, RequestFacts]:
        """Requests, errors and latency per group of buckets."""
        ...

    def labels(
        self,
        since: float,
        until: float,
        window_s: float,
        *,
        by: GroupBy = None,
        version: int | None = None,
        route: str | None = WEIGHTED,
    ) -> dict[Hashable, LabelFacts]:
        """Outcomes of predictions whose attribution window (`window_s`) has closed, per group of buckets."""
        ...


@dataclass(frozen=True)
class PairQuery:
    """A shadow phase's paired read: the shadow's copies logged in [since, until) joined with the
    baseline's answers to the same requests, with the outcomes of those whose attribution window
    (`window_s`) closed before `labels_before`."""

    shadow_version: int
    baseline_version: int
    since: float
    until: float
    window_s: float
    labels_before: float

    def whole_buckets(self) -> tuple[float, float]:
        """[lo, hi): the whole buckets of [since, until), as the arms' own counts read them."""
        lo = math.ceil(self.since / BUCKET_S) * BUCKET_S
        return float(lo), float(math.floor(self.until / BUCKET_S) * BUCKET_S)


def group_of(by: GroupBy, key: BucketKey) -> Hashable:
    return None if by is None else by(key)


def sum_requests(facts: Iterable[RequestFacts]) -> RequestFacts:
    facts = list(facts)
    return RequestFacts(
        sum(f.requests for f in facts),
        sum(f.errors for f in facts),
        LatencyHistogram(SparseCounts.concat([f.latency.counts for f in facts])),
    )


def sum_labels(facts: Iterable[LabelFacts]) -> LabelFacts:
    facts = list(facts)
    return LabelFacts(
        closed=sum(f.closed for f in facts),
        positives=sum(f.positives for f in facts),
        correct=sum(f.correct for f in facts),
        log_loss_sum=sum(f.log_loss_sum for f in facts),
        scores_pos=SparseCounts.concat([f.scores_pos for f in facts]),
        scores_neg=SparseCounts.concat([f.scores_neg for f in facts]),
        ranked=sum(f.ranked for f in facts),
        click_positions=SparseCounts.concat([f.click_positions for f in facts]),
    )


def _inside(key: BucketKey, since: float, until: float) -> bool:
    return key.start >= since and key.start + BUCKET_S <= until


def _matches(key: BucketKey, version: int | None, route: str | None) -> bool:
    return (version is None or key.version == version) and (route is None or key.route == route)


def _grouped(items: dict, since, until, by, version, route, total) -> dict:
    groups: dict[Hashable, list] = {}
    for key, facts in sorted(items.items()):
        if _inside(key, since, until) and _matches(key, version, route):
            groups.setdefault(group_of(by, key), []).append(facts)
    return {g: total(fs) for g, fs in groups.items()}


class MemoryMetricsSource:
    """The same summaries held in dicts (fine buckets only): for unit tests and the simulation."""

    def __init__(self) -> None:
        self.request_facts: dict[BucketKey, RequestFacts] = {}
        self.label_facts: dict[float, dict[BucketKey, LabelFacts]] = {}

    def add_requests(self, facts: dict[BucketKey, RequestFacts]) -> None:
        merge_into(self.request_facts, facts)

    def add_labels(self, window_s: float, facts: dict[BucketKey, LabelFacts]) -> None:
        merge_into(self.label_facts.setdefault(float(window_s), {}), facts)

    def requests(self, since, until, *, by=None, version=None, route=WEIGHTED):
        return _grouped(self.request_facts, since, until, by, version, route, sum_requests)

    def labels(self, since, until, window_s, *, by=None, version=None, route=WEIGHTED):
        items = self.label_facts.get(float(window_s), {})
        return _grouped(items, since, until, by, version, route, sum_labels)
