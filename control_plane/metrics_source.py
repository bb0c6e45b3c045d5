"""Where an evaluation's numbers come from: one small interface over the bucketed aggregates.

Every read that decides or shows something goes through a `MetricsSource` (as Flagger's metric
providers do): the SQL tables today (`queries.SqlMetricsSource`), an in-memory store for unit tests and
the simulation; a column store or Prometheus could answer the same two questions tomorrow without
`decide()` or the observation builder (`observations.py`) knowing.
"""

from __future__ import annotations

from typing import Protocol

from control_plane.analysis.aggregates import BUCKET_S, BucketKey, LabelFacts, RequestFacts, merge_into

WEIGHTED = "weighted"


class MetricsSource(Protocol):
    """Bucketed summaries whose buckets lie wholly in [since, until), optionally of one version and route."""

    def request_buckets(
        self, since: float, until: float, *, version: int | None = None, route: str | None = WEIGHTED
    ) -> list[tuple[BucketKey, RequestFacts]]: ...

    def label_buckets(
        self,
        since: float,
        until: float,
        window_s: float,
        *,
        version: int | None = None,
        route: str | None = WEIGHTED,
    ) -> list[tuple[BucketKey, LabelFacts]]: ...


def _inside(key: BucketKey, width: int, since: float, until: float) -> bool:
    return key.start >= since and key.start + width <= until


def _matches(key: BucketKey, version: int | None, route: str | None) -> bool:
    return (version is None or key.version == version) and (route is None or key.route == route)


class MemoryMetricsSource:
    """The same summaries held in dicts: for unit tests and `recsys simulate` (fine buckets only)."""

    def __init__(self) -> None:
        self.requests: dict[BucketKey, RequestFacts] = {}
        self.labels: dict[float, dict[BucketKey, LabelFacts]] = {}

    def add_requests(self, facts: dict[BucketKey, RequestFacts]) -> None:
        merge_into(self.requests, facts)

    def add_labels(self, window_s: float, facts: dict[BucketKey, LabelFacts]) -> None:
        merge_into(self.labels.setdefault(float(window_s), {}), facts)

    def request_buckets(self, since, until, *, version=None, route=WEIGHTED):
        return sorted(
            (k, v)
            for k, v in self.requests.items()
            if _inside(k, BUCKET_S, since, until) and _matches(k, version, route)
        )

    def label_buckets(self, since, until, window_s, *, version=None, route=WEIGHTED):
        return sorted(
            (k, v)
            for k, v in self.labels.get(float(window_s), {}).items()
            if _inside(k, BUCKET_S, since, until) and _matches(k, version, route)
        )
