"""The shadow copies' join on pair_key through Postgres: partitioned `predictions` and `labels`, migrated
through 0006: the same rows give the same sums as on SQLite (JSON served lists, labels by issued_ts)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from control_plane import queries
from control_plane.analysis.paired import Moments
from tests.unit.test_paired import seed_pairs

pytestmark = pytest.mark.integration


def test_the_join_on_pair_key_sums_the_same_on_postgres(pg_engine):
    now, t = seed_pairs(pg_engine)
    with pg_engine.connect() as conn:
        conn.execute(text("ANALYZE predictions"))
        facts = queries.SqlMetricsSource(conn).pairs(3, 2, t, now, 60.0, now)
    assert facts.pairs == 3
    assert facts.latency_diff == Moments(3, 12.0, 48.0)
    assert (facts.ranked, facts.overlap_sum) == (1, pytest.approx(0.5))
    assert facts.correct_diff == Moments(3, -1.0, 1.0)
