"""Retention on SQLite: raw rows deleted in small batches past the window, never what is still needed;
fine aggregates rolled up into hourly ones without changing any sum."""

from __future__ import annotations

import pytest

from control_plane import observations, queries, retention
from control_plane.analysis.aggregates import COARSE_BUCKET_S
from control_plane.db.engine import make_engine, migrate

HOUR = 3600.0
NOW = 1_000_000 * HOUR  # on an hour


def row(i: int, ts: float, version: int = 1) -> dict:
    return {
        "request_id": f"r{i}",
        "ts": ts,
        "model_version": version,
        "role": "baseline",
        "route": "weighted",
        "endpoint": "predict",
        "features": None,
        "score": 0.8,
        "latency_ms": 2.0 + i % 50,
        "status": 200 if i % 10 else 503,
    }


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    e = make_engine(url)
    # 12 hours of predictions, 200 an hour, each labelled when made
    rows = [row(i, NOW - 12 * HOUR + i * 18.0) for i in range(2400)]
    with e.begin() as conn:
        queries.insert_predictions(conn, rows)
        queries.insert_labels_rows(
            conn, [{"request_id": r["request_id"], "label": 1, "ts": r["ts"]} for r in rows]
        )
    yield e
    e.dispose()


POLICY = retention.RetentionPolicy(raw_s=6 * HOUR, fine_s=3 * HOUR, aggregate_s=10 * HOUR, batch_rows=100)


def test_retention_deletes_raw_rows_past_the_window_in_batches(engine):
    queries.close_label_windows(
        engine, window_s=60, now=NOW, settle_s=0, start_at=NOW - 12 * HOUR, span_s=HOUR
    )
    report = retention.apply(engine, POLICY, NOW)
    assert report.raw_cutoff == NOW - 6 * HOUR
    with engine.connect() as conn:
        assert queries.earliest_prediction(conn) >= NOW - 6 * HOUR
        assert queries.prediction_count(conn) == 1200
        assert queries.count_rows(conn, "labels") == 1200
    assert report.predictions_deleted == 1200 and report.labels_deleted == 1200


def test_retention_keeps_what_an_open_rollout_or_an_unclosed_window_needs(engine):
    report = retention.apply(engine, POLICY, NOW, open_since=NOW - 9 * HOUR)
    assert report.raw_cutoff == NOW - 9 * HOUR  # the rollout began 9 h ago
    queries.close_label_windows(
        engine, window_s=60, now=NOW - 10 * HOUR, settle_s=0, start_at=NOW - 12 * HOUR
    )
    report = retention.apply(engine, POLICY, NOW)
    assert report.raw_cutoff == pytest.approx(NOW - 10 * HOUR - 60, abs=5)  # predictions not yet counted stay


def test_the_roll_up_changes_no_sum_and_old_aggregates_go(engine):
    queries.close_label_windows(
        engine, window_s=60, now=NOW, settle_s=0, start_at=NOW - 12 * HOUR, span_s=HOUR
    )

    def totals():
        with engine.connect() as conn:
            src = queries.SqlMetricsSource(conn)
            since = NOW - 8 * HOUR  # on an hour: whole coarse buckets
            req = src.requests(since, NOW, version=1)[None]
            lab = src.labels(since, NOW, 60, version=1)[None]
            return req.requests, req.errors, req.latency.quantile(0.99), lab.closed, lab.correct

    before = totals()
    report = retention.apply(engine, POLICY, NOW)
    assert report.buckets_rolled_up > 0 and report.buckets_deleted > 0
    assert totals() == before
    with engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        widths = {
            k.start % COARSE_BUCKET_S for k in src.requests(NOW - 10 * HOUR, NOW - 3 * HOUR, by=lambda k: k)
        }
        assert widths == {0}  # only hourly buckets older than the fine retention
        assert src.requests(0, NOW - 10 * HOUR) == {}  # past the aggregate retention
    arm = observations.window_counts(
        queries.SqlMetricsSource(engine.connect()),
        versions={"baseline": 1},
        since=NOW - 8 * HOUR,
        now=NOW,
        label_window_s=60,
    )["baseline"]
    assert arm["requests"] == before[0]
