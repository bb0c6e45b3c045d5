"""Bounded storage: raw rows kept for a retention window, aggregates for a year, partitions made ahead.

Fine (5-second) buckets are rolled up into hourly ones after `fine_s`; the shadow phase's paired sums
(pair_buckets, pair_label_buckets) are deleted then instead, as nothing reads them once their rollout
is over.

On Postgres `predictions` and `labels` are partitioned by hour of prediction time (a label's by the
time its request id was issued): retention drops whole partitions
(no row-by-row delete, no vacuum debt) and creates the next day's ahead of the writers. On SQLite it
deletes in small batches, each its own short transaction, so writers wait for one batch at most.
Nothing an open rollout or an unclosed attribution window still needs is removed: the cutoff never
passes the oldest open rollout's start nor the oldest label watermark.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from control_plane import queries
from control_plane.analysis.aggregates import COARSE_BUCKET_S

AHEAD_S = 24 * 3600  # Postgres partitions exist this far ahead of now


@dataclass(frozen=True)
class RetentionPolicy:
    raw_s: float  # predictions and labels
    fine_s: float  # 5-second aggregate buckets, then rolled up into hourly ones (never an open rollout's)
    aggregate_s: float  # hourly aggregate buckets
    batch_rows: int = 5000  # SQLite: rows per delete transaction


@dataclass(frozen=True)
class RetentionReport:
    raw_cutoff: float
    partitions_created: int = 0  # of predictions and labels together
    partitions_dropped: int = 0
    predictions_deleted: int = 0
    labels_deleted: int = 0
    buckets_rolled_up: int = 0
    buckets_deleted: int = 0


def raw_cutoff(engine: Engine, policy: RetentionPolicy, now: float, open_since: float | None) -> float:
    """Raw rows before this may go: past the retention window, before any open rollout and any watermark."""
    cutoff = now - policy.raw_s
    with engine.connect() as conn:
        mark = queries.oldest_watermark(conn)
    for floor in (open_since, mark):
        if floor is not None:
            cutoff = min(cutoff, floor)
    return cutoff


def apply(
    engine: Engine, policy: RetentionPolicy, now: float, open_since: float | None = None
) -> RetentionReport:
    """One pass; safe to run twice or at once with another (each step is idempotent)."""
    cutoff = raw_cutoff(engine, policy, now, open_since)
    preds = _expire(engine, "predictions", queries.delete_predictions_before, cutoff, now, policy.batch_rows)
    labs = _expire(engine, "labels", queries.delete_labels_before, cutoff, now, policy.batch_rows)
    # An open rollout's buckets stay fine: its window's edges are read at the fine bucket.
    rollup_before = now - policy.fine_s if open_since is None else min(now - policy.fine_s, open_since)
    rolled = _in_batches(engine, lambda conn: queries.roll_up(conn, rollup_before, COARSE_BUCKET_S))
    with engine.begin() as conn:
        gone = queries.delete_buckets_before(conn, now - policy.aggregate_s)
        # Per-user rows serve a rollout's user-level tests only: kept as long as the raw rows.
        gone += queries.delete_user_buckets_before(conn, cutoff)
        # Paired sums serve a shadow phase's decisions only: they go with the fine buckets.
        gone += queries.delete_pair_buckets_before(conn, rollup_before)
    return RetentionReport(
        cutoff,
        partitions_created=preds.created + labs.created,
        partitions_dropped=preds.dropped + labs.dropped,
        predictions_deleted=preds.deleted,
        labels_deleted=labs.deleted,
        buckets_rolled_up=rolled,
        buckets_deleted=gone,
    )


@dataclass(frozen=True)
class _Expired:
    created: int = 0
    dropped: int = 0
    deleted: int = 0


def _expire(engine: Engine, table: str, delete, cutoff: float, now: float, batch: int) -> _Expired:
    """Postgres: make the next day's partitions of `table` and drop those past the cutoff; SQLite: delete
    the rows past it in batches."""
    with engine.begin() as conn:
        if queries.partitioned(conn, table):
            made = queries.create_partitions(conn, now, now + AHEAD_S, table)
            return _Expired(
                created=len(made), dropped=len(queries.drop_partitions_before(conn, cutoff, table))
            )
    return _Expired(deleted=_in_batches(engine, lambda conn: delete(conn, cutoff, batch)))


def _in_batches(engine: Engine, step) -> int:
    total = 0
    while True:
        with engine.begin() as conn:
            n = step(conn)
        total += n
        if n == 0:
            return total
