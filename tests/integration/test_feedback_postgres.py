"""POST /feedback against the real Postgres: single, batch, duplicate, early label, malformed, outage."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, insert, select

from control_plane.db.engine import make_engine
from control_plane.db.schema import labels, predictions
from control_plane.web.app import create_app
from tests.web_support import make_context, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def client(pg_url, pg_engine, tmp_path):
    settings = make_settings(tmp_path, pg_url)
    ctx = make_context(settings, pg_engine)
    app = create_app(settings, ctx)
    return app.test_client(), ctx


def label_rows(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(labels.c.request_id, labels.c.label)).all())


def test_a_single_label_is_stored(client, pg_engine):
    c, _ = client
    resp = c.post("/feedback", json={"request_id": "r1", "label": 1})
    assert resp.status_code == 200 and resp.json == {"accepted": 1, "stored": "stored"}
    assert label_rows(pg_engine) == {"r1": 1}


def test_a_batch_is_stored_in_one_request(client, pg_engine):
    c, _ = client
    resp = c.post("/feedback", json=[{"request_id": f"r{i}", "label": i % 2} for i in range(50)])
    assert resp.status_code == 200 and resp.json["accepted"] == 50
    assert len(label_rows(pg_engine)) == 50
    assert c.post("/feedback", json={"labels": [{"request_id": "x", "label": 0}]}).status_code == 200


def test_a_second_label_replaces_the_first_and_counts_once(client, pg_engine):
    c, _ = client
    c.post("/feedback", json={"request_id": "dup", "label": 0})
    c.post("/feedback", json={"request_id": "dup", "label": 1})
    assert label_rows(pg_engine) == {"dup": 1}


def test_a_label_that_arrives_before_its_prediction_is_matched_when_the_row_lands(client, pg_engine):
    c, _ = client
    c.post("/feedback", json={"request_id": "early", "label": 1})
    with pg_engine.begin() as conn:
        conn.execute(
            insert(predictions).values(
                request_id="early",
                ts=time.time(),
                model_version=1,
                role="baseline",
                route="weighted",
                endpoint="predict",
                score=0.9,
                latency_ms=3.0,
                status=200,
            )
        )
        joined = conn.execute(
            select(func.count()).select_from(
                predictions.join(labels, labels.c.request_id == predictions.c.request_id)
            )
        ).scalar()
    assert joined == 1


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b'{"request_id": "a"}', "label must be 0 or 1"),
        (b'{"request_id": "a", "label": 2}', "label must be 0 or 1"),
        (b'{"request_id": "a", "label": true}', "label must be 0 or 1"),
        (b'{"request_id": "", "label": 1}', "request_id must be a non-empty string"),
        (b'{"request_id": 5, "label": 1}', "request_id must be a non-empty string"),
        (b'{"request_id": "a", "label": 1, "extra": 1}', "unknown field"),
        (b"[]", "no labels given"),
        (b'[{"request_id": "a", "label": 1}, 7]', "labels[1]"),
        (b'{"request_id": "a", "label": NaN}', "not valid JSON"),
    ],
)
def test_a_malformed_body_gets_a_400_naming_the_problem_and_stores_nothing(client, pg_engine, body, message):
    c, _ = client
    resp = c.post("/feedback", data=body, content_type="application/json")
    assert resp.status_code == 400
    assert message in resp.json["error"]
    assert label_rows(pg_engine) == {}


def test_labels_sent_while_the_database_is_down_are_kept_and_replayed(client, pg_engine, pg_url, tmp_path):
    c, ctx = client
    good = ctx.engine
    ctx.engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    from control_plane.web.wiring import EXTENSION

    c.application.extensions[EXTENSION].label_sink = None
    resp = c.post("/feedback", json={"request_id": "during-outage", "label": 1})
    assert resp.status_code == 202 and resp.json["stored"] == "spilled"
    assert label_rows(pg_engine) == {}
    ctx.engine = good
    c.application.extensions[EXTENSION].label_sink = None
    assert c.post("/feedback", json={"request_id": "after", "label": 0}).status_code == 200
    assert label_rows(pg_engine) == {"during-outage": 1, "after": 0}
