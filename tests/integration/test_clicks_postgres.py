"""Clicks through Postgres (partitioned `predictions` and `labels`, migrated through 0005): the served list
written by the prediction log's writer (COPY), a click checked against it by /feedback, and the label
job's ranking sums read back as the decision reads them."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from bentos.predlog import PredictionLogWriter, default_engine_factory, row_from_dict
from control_plane import queries
from control_plane.analysis.ranking import Metric, metric_sums
from control_plane.db.schema import predictions
from control_plane.web.app import create_app
from tests.prediction_rows import prediction, rid_at
from tests.web_support import LABEL_HEADERS, make_context, make_settings

pytestmark = pytest.mark.integration

WINDOW_S = 600  # the clicks come about 200 s after their answers: within it
# item ids with what COPY's text format must escape, and what JSON must
SERVED = ["plain", "tab\there", "back\\slash", 'quo"te', "new\nline", "üñí"]


def test_clicks_are_checked_against_the_logged_list_and_summed_by_the_label_job(pg_url, pg_engine, tmp_path):
    now = time.time()
    t0 = now - 200
    rows = [prediction(rid_at(t0 + i), t0 + i, served=SERVED) for i in range(20)]
    rows.append(prediction(rid_at(t0 + 20), t0 + 20, endpoint="predict"))
    with PredictionLogWriter(default_engine_factory(pg_url), tmp_path / "spill", flush_interval_s=0.05) as w:
        w.log_many([row_from_dict(r) for r in rows])
    with pg_engine.connect() as conn:
        logged = dict(conn.execute(select(predictions.c.request_id, predictions.c.served)).all())
    assert logged[rows[0]["request_id"]] == SERVED and logged[rows[-1]["request_id"]] is None

    client = create_app(ctx=make_context(make_settings(tmp_path / "state", pg_url), pg_engine)).test_client()
    clicks = [
        {"request_id": rows[i]["request_id"], "item_id": SERVED[i % 6], "position": i % 6 + 1}
        for i in range(0, 20, 2)
    ]
    resp = client.post("/feedback", json=clicks, headers=LABEL_HEADERS)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["new_clicks"] == 10
    wrong = client.post(
        "/feedback",
        json={"request_id": rows[1]["request_id"], "item_id": "tab\there", "position": 3},
        headers=LABEL_HEADERS,
    )
    assert wrong.status_code == 400 and "served at position 2" in wrong.get_json()["error"]
    on_predict = client.post(
        "/feedback",
        json={"request_id": rows[-1]["request_id"], "item_id": "plain", "position": 1},
        headers=LABEL_HEADERS,
    )
    assert on_predict.status_code == 400 and "/predict answer" in on_predict.get_json()["error"]

    queries.close_label_windows(
        pg_engine, window_s=WINDOW_S, now=time.time() + WINDOW_S, settle_s=0, start_at=t0
    )
    with pg_engine.connect() as conn:
        lab = queries.SqlMetricsSource(conn).labels(t0 - 5, now, WINDOW_S, version=1)[None]
    assert (lab.closed, lab.ranked, lab.positives) == (21, 20, 10)
    want = [i % 6 + 1 for i in range(0, 20, 2)]
    mrr = metric_sums(Metric.MRR, lab.ranked, lab.click_positions, 10)
    assert mrr.sum == pytest.approx(sum(1 / p for p in want)) and mrr.n == 20
