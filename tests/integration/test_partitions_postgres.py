"""Postgres: the migrations partition existing `predictions` and `labels` tables by hour (a label by the
time its request id was issued) and sum the predictions into the aggregates; retention drops whole
partitions of both past the window, never an open rollout's, and makes the next day's ahead."""

from __future__ import annotations

import time
import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, func, insert, select, text

from control_plane import queries, retention
from control_plane.db.engine import alembic_config, make_engine
from control_plane.db.schema import labels, predictions
from control_plane.errors import LabelConflict
from control_plane.labels import record_labels
from control_plane.request_ids import RequestIdSigner, issued_at
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


SIGNER = RequestIdSigner.ephemeral()


def issued_id(ts: float) -> str:
    """An id of the form the Bentos issue, issued at `ts`."""
    return SIGNER.issue(f"{int(ts * 1e9):016x}{uuid.uuid4().int & (2**64 - 1):016x}")


def rows(now: float, hours: int, per_hour: int) -> list[dict]:
    return [
        {
            "request_id": issued_id(now - (h + 0.5) * HOUR + i),
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
    served = rows(now, hours=10, per_hour=30)
    with engine.begin() as conn:
        conn.execute(insert(predictions), served)
        # labels as they were stored before issued_ts existed: half of them, each 90 s after its prediction
        conn.execute(
            text("INSERT INTO labels (request_id, label, ts) VALUES (:request_id, 1, :ts)"),
            [{"request_id": r["request_id"], "ts": r["ts"] + 90} for r in served[::2]],
        )
        conn.execute(
            text("INSERT INTO labels (request_id, label, ts) VALUES ('not-issued', 0, :ts)"), {"ts": now}
        )
    command.upgrade(alembic_config(empty_database), "head")
    with engine.connect() as conn:
        assert queries.predictions_partitioned(conn) and queries.partitioned(conn, "labels")
        assert queries.prediction_count(conn) == 300  # every existing row kept
        stored = dict(conn.execute(select(labels.c.request_id, labels.c.issued_ts)).all())
        assert len(stored) == 151
        # each label sits at its prediction's time; the one whose id has another form at its arrival
        assert all(stored[r["request_id"]] == pytest.approx(r["ts"], abs=1e-6) for r in served[::2])
        assert stored["not-issued"] == now
        assert conn.execute(text("SELECT COUNT(*) FROM labels_default")).scalar() == 0
        assert queries.partition_starts(conn, "labels") == queries.partition_starts(conn)
        starts = queries.partition_starts(conn)
        src = queries.SqlMetricsSource(conn)
        assert src.requests(0, now + HOUR, version=1)[None].requests == 300  # summed into the aggregates
        default = conn.execute(text("SELECT COUNT(*) FROM predictions_default")).scalar()
    assert default == 0 and min(starts) <= now - 9.5 * HOUR and max(starts) >= now + 20 * HOUR

    policy = retention.RetentionPolicy(raw_s=4 * HOUR, fine_s=2 * 86400, aggregate_s=365 * 86400)
    report = retention.apply(engine, policy, now, open_since=now - 6 * HOUR)  # a rollout began 6 h ago
    with engine.connect() as conn:
        assert queries.earliest_prediction(conn) >= now - 7 * HOUR  # the rollout's hours stay
    assert report.partitions_dropped == 6  # the hours before the rollout began, and no more, of both tables
    report = retention.apply(engine, policy, now)  # the rollout is over
    with engine.connect() as conn:
        oldest = queries.earliest_prediction(conn)
        kept = queries.prediction_count(conn)
        assert queries.partition_starts(conn)[-1] >= now + 23 * HOUR  # made ahead
    assert now - 5 * HOUR <= oldest  # within the window and at most one partition more
    assert kept <= 5 * 30  # four hours of the window and the partition the cutoff falls in
    with engine.connect() as conn:  # the labels went with their predictions
        oldest_label = conn.execute(select(func.min(labels.c.issued_ts))).scalar()
    assert oldest_label >= oldest
    # A row written now lands in its hour's partition, not the default one.
    with engine.begin() as conn:
        queries.insert_predictions(conn, [{**rows(now, 1, 1)[0], "request_id": "new", "ts": now}])
        assert conn.execute(text("SELECT COUNT(*) FROM predictions_default")).scalar() == 0
    engine.dispose()


def test_a_label_lands_in_its_prediction_s_hour_and_stays_the_request_s_only_label(empty_database):
    command.upgrade(alembic_config(empty_database), "head")
    engine = make_engine(empty_database)
    now = time.time()
    old, new = issued_id(now - 2 * HOUR), issued_id(now)
    assert issued_at(old) == pytest.approx(now - 2 * HOUR, abs=1e-6)
    with engine.begin() as conn:
        queries.create_partitions(conn, now - 3 * HOUR, now + HOUR, "labels")
    assert record_labels(engine, [(old, 1), (new, 0)], now) == 2
    with engine.connect() as conn:
        where = dict(conn.execute(text("SELECT request_id, tableoid::regclass::text FROM labels")).all())
    hour = lambda t: int(t // HOUR * HOUR)  # noqa: E731
    assert where == {old: f"labels_p{hour(now - 2 * HOUR)}", new: f"labels_p{hour(now)}"}
    # the key includes the issue time, which the id fixes: a second label for the id is still refused
    with pytest.raises(LabelConflict):
        record_labels(engine, [(old, 0)], now + 1)
    assert record_labels(engine, [(old, 1)], now + 2, refuse_conflicts=False) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(labels)).scalar() == 2
    engine.dispose()
