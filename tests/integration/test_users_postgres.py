"""Per-user aggregates on Postgres (a partitioned `predictions`, migrated through 0003), written by the
prediction log's writer (COPY) as a Bento writes them."""

from __future__ import annotations

import pytest

from bentos.predlog import PredictionLogWriter, default_engine_factory, row_from_dict
from tests.unit.test_user_level import check_user_aggregates
from tests.unit.test_user_ranking import check_user_ranking

pytestmark = pytest.mark.integration


def test_user_aggregates_through_the_writer_on_postgres(pg_url, pg_engine, tmp_path):
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE user_requests, user_labels, user_clicks")

    def insert(batch: list[dict]) -> None:
        with PredictionLogWriter(
            default_engine_factory(pg_url), tmp_path / "spill", flush_interval_s=0.05
        ) as w:
            w.log_many([row_from_dict(r) for r in batch])

    check_user_aggregates(pg_engine, insert)
    with pg_engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT count(*) FROM predictions WHERE user_key IS NOT NULL").scalar()
    assert stored == 37


def test_user_ranking_sums_through_the_writer_on_postgres(pg_url, pg_engine, tmp_path):
    """The per-user ranking sums (migration 0008) of rows the writer COPYs, closed by the label job on
    Postgres: the same check as on SQLite, CTR@k for two k from the clicks per position."""

    def insert(batch: list[dict]) -> None:
        with PredictionLogWriter(
            default_engine_factory(pg_url), tmp_path / "spill", flush_interval_s=0.05
        ) as w:
            w.log_many([row_from_dict(r) for r in batch])

    check_user_ranking(pg_engine, insert)
