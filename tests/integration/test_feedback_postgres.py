"""POST /feedback against the real Postgres: credential, issued ids, single, batch, one outcome, malformed, outage."""

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
from tests.web_support import LABEL_HEADERS, TOKEN, issued_id, make_context, make_settings

pytestmark = pytest.mark.integration


class LabelClient:
    """The app's test client, posting to /feedback with the label-ingest token unless told otherwise."""

    def __init__(self, client):
        self.client = client
        self.application = client.application

    def post(self, path, *, headers=None, **kwargs):
        return self.client.post(path, headers=LABEL_HEADERS if headers is None else headers, **kwargs)

    def get(self, path, **kwargs):
        return self.client.get(path, **kwargs)


@pytest.fixture
def client(pg_url, pg_engine, tmp_path):
    settings = make_settings(tmp_path, pg_url)
    ctx = make_context(settings, pg_engine)
    app = create_app(settings, ctx)
    return LabelClient(app.test_client()), ctx


# Issued (signed) ids, as the Bentos return them; the module's tests each use their own.
R1, DUP, EARLY, DURING, AFTER = (issued_id(name) for name in ("r1", "dup", "early", "during-outage", "after"))


def label_rows(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(labels.c.request_id, labels.c.label)).all())


def waiting(spill_dir) -> list:
    """Label spill files and claims not yet replayed (dead-letter files are not)."""
    return [*spill_dir.glob("labels-*.jsonl"), *spill_dir.glob("claimed-labels-*.jsonl")]


def test_a_single_label_is_stored(client, pg_engine):
    c, _ = client
    resp = c.post("/feedback", json={"request_id": R1, "label": 1})
    assert resp.status_code == 200 and resp.json == {"accepted": 1, "stored": "stored"}
    assert label_rows(pg_engine) == {R1: 1}


def test_a_batch_is_stored_in_one_request(client, pg_engine):
    c, _ = client
    ids = [issued_id() for _ in range(50)]
    resp = c.post("/feedback", json=[{"request_id": rid, "label": i % 2} for i, rid in enumerate(ids)])
    assert resp.status_code == 200 and resp.json["accepted"] == 50
    assert len(label_rows(pg_engine)) == 50
    assert c.post("/feedback", json={"labels": [{"request_id": issued_id(), "label": 0}]}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no credential"),
        ({"Authorization": f"Bearer {TOKEN}"}, "the operator's token is not the label token"),
        ({"Authorization": "Bearer wrong"}, "a wrong token"),
        ({"Authorization": LABEL_HEADERS["Authorization"].replace("Bearer", "Basic")}, "not a Bearer token"),
    ],
)
def test_a_label_without_the_label_ingest_token_is_refused_and_stores_nothing(
    client, pg_engine, headers, why
):
    c, _ = client
    resp = c.post("/feedback", json={"request_id": R1, "label": 1}, headers=headers)
    assert resp.status_code == 401, why
    assert "label-ingest token" in resp.json["error"] and resp.headers["WWW-Authenticate"].startswith(
        "Bearer"
    )
    assert label_rows(pg_engine) == {}


@pytest.mark.parametrize(
    "forged",
    [
        "r1",  # a plain id, as clients used to send
        R1[:-1] + ("0" if R1[-1] != "0" else "1"),  # one digit of the signature changed
        R1.rsplit(".", 1)[0] + ".",  # the signature cut off
        issued_id().replace(".", "-x.", 1),  # the signed part changed
        "caf\u00e9." + "0" * 24,  # not ASCII
    ],
)
def test_a_label_for_an_id_the_system_did_not_issue_is_refused_naming_it(client, pg_engine, forged):
    c, _ = client
    resp = c.post("/feedback", json=[{"request_id": R1, "label": 1}, {"request_id": forged, "label": 0}])
    assert resp.status_code == 400
    assert "not issued by this system" in resp.json["error"] and repr(forged[:80]) in resp.json["error"]
    assert label_rows(pg_engine) == {}  # nothing of the batch


def test_a_request_s_first_label_is_its_outcome(client, pg_engine):
    c, _ = client
    assert c.post("/feedback", json={"request_id": DUP, "label": 0}).status_code == 200
    again = c.post("/feedback", json={"request_id": DUP, "label": 0})
    assert again.status_code == 200  # the same label again: a retry, harmless
    flipped = c.post("/feedback", json=[{"request_id": R1, "label": 1}, {"request_id": DUP, "label": 1}])
    assert flipped.status_code == 409
    assert "already have a different label" in flipped.json["error"] and repr(DUP) in flipped.json["error"]
    assert label_rows(pg_engine) == {DUP: 0}  # neither the flip nor the rest of its batch


def test_a_label_that_arrives_before_its_prediction_is_matched_when_the_row_lands(client, pg_engine):
    c, _ = client
    c.post("/feedback", json={"request_id": EARLY, "label": 1})
    with pg_engine.begin() as conn:
        conn.execute(
            insert(predictions).values(
                request_id=EARLY,
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
    resp = c.post(
        "/feedback", data=body.replace(b'"a"', json.dumps(R1).encode()), content_type="application/json"
    )
    assert resp.status_code == 400
    assert message in resp.json["error"]
    assert label_rows(pg_engine) == {}


def test_labels_sent_while_the_database_is_down_are_kept_and_replayed(client, pg_engine, pg_url, tmp_path):
    c, ctx = client
    good = ctx.engine
    ctx.engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    from control_plane.web.wiring import EXTENSION

    c.application.extensions[EXTENSION].label_sink = None
    resp = c.post("/feedback", json={"request_id": DURING, "label": 1})
    assert resp.status_code == 202 and resp.json["stored"] == "spilled"
    assert label_rows(pg_engine) == {}
    ctx.engine = good
    c.application.extensions[EXTENSION].label_sink = None
    assert c.post("/feedback", json={"request_id": AFTER, "label": 0}).status_code == 200
    # replayed on a thread of its own, started by the first label stored
    wait_for(lambda: label_rows(pg_engine) == {DURING: 1, AFTER: 0}, 10, "the spilled label replayed")
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
    later = [issued_id() for _ in range(5)]
    for rid in later:
        resp = c.post("/feedback", json={"request_id": rid, "label": 1})
        assert resp.status_code == 200, resp.get_data(as_text=True)
    wait_for(lambda: {"kept-1", "kept-2"} <= set(label_rows(pg_engine)), 10, "the good labels replayed")
    wait_for(lambda: not waiting(spill_dir), 10, "the spill file removed")
    assert set(label_rows(pg_engine)) == {"kept-1", "kept-2", *later}
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
        a, b, cc, d = (issued_id() for _ in range(4))
        resp = c.post(
            "/feedback",
            json=[{"request_id": a, "label": 1}, {"request_id": b, "label": 0}],
            headers=LABEL_HEADERS,
        )
        assert resp.status_code == 503
        assert "database is unreachable" in resp.json["error"] and "No space left" in resp.json["error"]
        assert 'recsys_label_spill_rows_total{outcome="refused"} 2.0' in c.get("/metrics").get_data(
            as_text=True
        )
        disk.free()  # space is back: the next label is kept again, without a restart
        assert (
            c.post("/feedback", json={"request_id": cc, "label": 1}, headers=LABEL_HEADERS).status_code == 202
        )
        ctx.engine = pg_engine
        from control_plane.web.wiring import EXTENSION

        c.application.extensions[EXTENSION].label_sink = None
        assert (
            c.post("/feedback", json={"request_id": d, "label": 1}, headers=LABEL_HEADERS).status_code == 200
        )
        wait_for(lambda: set(label_rows(pg_engine)) == {cc, d}, 10, "the spilled label replayed")
