"""POST /feedback against the real Postgres: single, batch, duplicate, early label, malformed, outage."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, insert, select

from control_plane.db.engine import make_engine
from control_plane.db.schema import labels, predictions
from control_plane.label_spill import dead_letter_lines
from control_plane.web.app import create_app
from tests.conftest import wait_for
from tests.small_disk import SmallDisk
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


def waiting(spill_dir) -> list:
    """Label spill files and claims not yet replayed (dead-letter files are not)."""
    return [*spill_dir.glob("labels-*.jsonl"), *spill_dir.glob("claimed-labels-*.jsonl")]


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
    # replayed on a thread of its own, started by the first label stored
    wait_for(
        lambda: label_rows(pg_engine) == {"during-outage": 1, "after": 0}, 10, "the spilled label replayed"
    )
    assert not waiting(ctx.settings.spill_dir)


def test_a_spilled_label_postgres_refuses_is_set_aside_and_feedback_keeps_answering(client, pg_engine):
    """A NUL in an id, a torn line: Postgres cannot take them, and they must not fail every later request."""
    c, ctx = client
    spill_dir = ctx.settings.spill_dir
    spill_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"request_id": "kept-1", "label": 1, "ts": 1.0}),
        json.dumps({"request_id": "nul\x00id", "label": 0, "ts": 1.0}),
        json.dumps({"request_id": "lone-\ud800", "label": 0, "ts": 1.0}),
        '{"request_id": "torn", "la',
        json.dumps({"request_id": "kept-2", "label": 0, "ts": 2.0}),
    ]
    (spill_dir / "labels-99999.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(5):
        resp = c.post("/feedback", json={"request_id": f"later-{i}", "label": 1})
        assert resp.status_code == 200, resp.get_data(as_text=True)
    wait_for(lambda: {"kept-1", "kept-2"} <= set(label_rows(pg_engine)), 10, "the good labels replayed")
    wait_for(lambda: not waiting(spill_dir), 10, "the spill file removed")
    assert set(label_rows(pg_engine)) == {"kept-1", "kept-2", *(f"later-{i}" for i in range(5))}
    assert dead_letter_lines(spill_dir) == 3
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'recsys_label_spill_rows_total{outcome="dead_letter"} 3.0' in metrics
    assert 'recsys_label_spill_rows_total{outcome="replayed"} 2.0' in metrics


def test_with_the_database_down_and_the_spill_disk_full_feedback_answers_503_and_counts_it(
    pg_url, pg_engine, tmp_path
):
    """A real full disk (a tmpfs): nothing can keep the labels, so the client hears so and may send again."""
    with SmallDisk(tmp_path / "spill", size_kb=256) as disk:
        settings = make_settings(tmp_path, pg_url)
        assert settings.spill_dir == disk.path
        ctx = make_context(settings, pg_engine)
        ctx.engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none")  # nothing listens there
        c = create_app(settings, ctx).test_client()
        disk.fill()
        resp = c.post("/feedback", json=[{"request_id": "a", "label": 1}, {"request_id": "b", "label": 0}])
        assert resp.status_code == 503
        assert "database is unreachable" in resp.json["error"] and "No space left" in resp.json["error"]
        assert 'recsys_label_spill_rows_total{outcome="refused"} 2.0' in c.get("/metrics").get_data(
            as_text=True
        )
        disk.free()  # space is back: the next label is kept again, without a restart
        assert c.post("/feedback", json={"request_id": "c", "label": 1}).status_code == 202
        ctx.engine = pg_engine
        from control_plane.web.wiring import EXTENSION

        c.application.extensions[EXTENSION].label_sink = None
        assert c.post("/feedback", json={"request_id": "d", "label": 1}).status_code == 200
        wait_for(lambda: set(label_rows(pg_engine)) == {"c", "d"}, 10, "the spilled label replayed")
