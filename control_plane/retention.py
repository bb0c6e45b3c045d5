"""Bounded storage: raw rows kept for a retention window, aggregates for a year, partitions made ahead.

On Postgres `predictions` is partitioned by hour of prediction time: retention drops whole partitions
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
    partitions_created: int = 0
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
    created = dropped = deleted = 0
    with engine.begin() as conn:
        partitioned = queries.predictions_partitioned(conn)
        if partitioned:
            created = len(queries.create_partitions(conn, now, now + AHEAD_S))
            dropped = len(queries.drop_partitions_before(conn, cutoff))
    if not partitioned:
        deleted = _in_batches(
            engine, lambda conn: queries.delete_predictions_before(conn, cutoff, policy.batch_rows)
        )
    labels = _in_batches(engine, lambda conn: queries.delete_labels_before(conn, cutoff, policy.batch_rows))
    # An open rollout's buckets stay fine: its window's edges are read at the fine bucket.
    rollup_before = now - policy.fine_s if open_since is None else min(now - policy.fine_s, open_since)
    rolled = _in_batches(engine, lambda conn: queries.roll_up(conn, rollup_before, COARSE_BUCKET_S))
    with engine.begin() as conn:
        gone = queries.delete_buckets_before(conn, now - policy.aggregate_s)
        # Per-user rows serve a rollout's user-level tests only: kept as long as the raw rows.
        gone += queries.delete_user_buckets_before(conn, cutoff)
    return RetentionReport(cutoff, created, dropped, deleted, labels, rolled, gone)


def _in_batches(engine: Engine, step) -> int:
    total = 0
    while True:
        with engine.begin() as conn:
            n = step(conn)
        total += n
        if n == 0:
            return total
