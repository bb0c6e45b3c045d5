"""Postgres: the migration partitions an existing `predictions` table by hour and sums it into the
aggregates; retention drops whole partitions past the window, never an open rollout's, and makes the
next day's partitions ahead."""

from __future__ import annotations

import time
import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, insert, text

from control_plane import queries, retention
from control_plane.db.engine import alembic_config, make_engine
from control_plane.db.schema import predictions
from tests.conftest import PG_ADMIN_URL

HOUR = 3600


@pytest.fixture
def empty_database():
    name = f"recsys_part_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def rows(now: float, hours: int, per_hour: int) -> list[dict]:
    return [
        {
            "request_id": f"r{h}-{i}",
            "ts": now - (h + 0.5) * HOUR + i,
            "model_version": 1,
            "role": "baseline",
            "route": "weighted",
            "endpoint": "predict",
            "features": [0.1, 0.2],
            "score": 0.7,
            "latency_ms": 3.0,
            "status": 200,
        }
        for h in range(hours)
        for i in range(per_hour)
    ]


def test_the_migration_partitions_existing_rows_and_retention_drops_whole_hours(empty_database):
    now = time.time() // HOUR * HOUR + 1800
    command.upgrade(alembic_config(empty_database), "0001")
    engine = make_engine(empty_database)
    with engine.begin() as conn:
        conn.execute(insert(predictions), rows(now, hours=10, per_hour=30))
    command.upgrade(alembic_config(empty_database), "head")
    with engine.connect() as conn:
        assert queries.predictions_partitioned(conn)
        assert queries.prediction_count(conn) == 300  # every existing row kept
        starts = queries.partition_starts(conn)
        src = queries.SqlMetricsSource(conn)
        assert src.requests(0, now + HOUR, version=1)[None].requests == 300  # summed into the aggregates
        default = conn.execute(text("SELECT COUNT(*) FROM predictions_default")).scalar()
    assert default == 0 and min(starts) <= now - 9.5 * HOUR and max(starts) >= now + 20 * HOUR

    policy = retention.RetentionPolicy(raw_s=4 * HOUR, fine_s=2 * 86400, aggregate_s=365 * 86400)
    report = retention.apply(engine, policy, now, open_since=now - 6 * HOUR)  # a rollout began 6 h ago
    with engine.connect() as conn:
        assert queries.earliest_prediction(conn) >= now - 7 * HOUR  # the rollout's hours stay
    assert report.partitions_dropped == 3  # the hours before the rollout began, and no more
    report = retention.apply(engine, policy, now)  # the rollout is over
    with engine.connect() as conn:
        oldest = queries.earliest_prediction(conn)
        kept = queries.prediction_count(conn)
        assert queries.partition_starts(conn)[-1] >= now + 23 * HOUR  # made ahead
    assert now - 5 * HOUR <= oldest  # within the window and at most one partition more
    assert kept <= 5 * 30  # four hours of the window and the partition the cutoff falls in
    # A row written now lands in its hour's partition, not the default one.
    with engine.begin() as conn:
        queries.insert_predictions(conn, [{**rows(now, 1, 1)[0], "request_id": "new", "ts": now}])
        assert conn.execute(text("SELECT COUNT(*) FROM predictions_default")).scalar() == 0
    engine.dispose()
