"""The shadow copies' join on pair_key through Postgres: partitioned `predictions` and `labels`, migrated
through 0007: the same rows give the same sums as on SQLite (JSON served lists, labels by issued_ts),
and the pair job's buckets read the same as the rows recomputed."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from control_plane import queries
from control_plane.analysis.paired import Moments
from control_plane.metrics_source import PairQuery
from tests.prediction_rows import settle_pairs
from tests.unit.test_pair_buckets import WINDOW_S, assert_same, shadow_traffic
from tests.unit.test_paired import seed_pairs

pytestmark = pytest.mark.integration


def test_the_join_on_pair_key_sums_the_same_on_postgres(pg_engine):
    now, t = seed_pairs(pg_engine)
    with pg_engine.connect() as conn:
        conn.execute(text("ANALYZE predictions"))
    assert settle_pairs(pg_engine, now, start_at=t - 200) == 3
    with pg_engine.connect() as conn:
        query = PairQuery(3, 2, t, now, 60.0, now)
        facts = queries.SqlMetricsSource(conn).pairs(query)
        assert queries.raw_pairs(conn, query) == facts
    assert facts.pairs == 3
    assert facts.latency_diff == Moments(3, 12.0, 48.0)
    assert (facts.ranked, facts.overlap_sum) == (1, pytest.approx(0.5))
    assert facts.correct_diff == Moments(3, -1.0, 1.0)


def test_the_pair_buckets_read_the_same_as_the_rows_on_postgres(pg_engine):
    t0 = 1_800_000_000.0
    with pg_engine.begin() as conn:
        queries.create_partitions(conn, t0 - 3600, t0 + 3600)
        queries.create_partitions(conn, t0 - 3600, t0 + 3600, "labels")
    shadow_traffic(pg_engine, t0, 120, 10)
    for now in (t0 + 40, t0 + 100, t0 + 300):  # three ticks
        settle_pairs(pg_engine, now, start_at=t0)
    with pg_engine.connect() as conn:
        src = queries.SqlMetricsSource(conn)
        for since, until, labels_before in [(t0, t0 + 300, t0 + 300), (t0 + 7, t0 + 93, t0 + 80)]:
            query = PairQuery(3, 2, since, until, WINDOW_S, labels_before)
            want = queries.raw_pairs(conn, query)
            assert want.pairs > 500 and want.correct_diff.n > 0
            assert_same(src.pairs(query), want)


def test_two_pair_jobs_at_once_take_turns_and_count_each_pair_once(pg_engine):
    from concurrent.futures import ThreadPoolExecutor

    t0 = 1_800_000_000.0
    shadow_traffic(pg_engine, t0, 240, 10)
    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(lambda _: settle_pairs(pg_engine, t0 + 400, start_at=t0), range(4)))
    with pg_engine.connect() as conn:
        query = PairQuery(3, 2, t0, t0 + 240, WINDOW_S, t0 + 400)
        want = queries.raw_pairs(conn, query)
        assert_same(queries.SqlMetricsSource(conn).pairs(query), want)
    assert sum(added) == want.pairs > 1500 and want.correct_diff.n > 0
