"""Clicks on /recommend answers: the body's validation, the check against the served list, storage as the
request's label, the label job's ranking sums, and /feedback's answers (SQLite)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from bentos.schemas import MAX_CANDIDATES
from control_plane import queries
from control_plane.analysis.ranking import MAX_POSITION, Metric, metric_sums
from control_plane.clicks import Click, ClickNotLogged, parse_feedback, record_clicks
from control_plane.db.schema import labels
from control_plane.errors import InvalidRequest, LabelConflict
from control_plane.labels import record_labels
from control_plane.web import create_app
from tests.prediction_rows import prediction, rid_at
from tests.web_support import LABEL_HEADERS, make_context, make_settings

WINDOW_S = 60


# --- the body ---------------------------------------------------------------
def test_a_click_names_the_item_and_its_position_and_labels_keep_their_form():
    fb = parse_feedback(
        [
            {"request_id": "a", "item_id": "i7", "position": 3},
            {"request_id": "b", "label": 0},
            {"request_id": "c", "item_id": "i1", "position": 1, "label": 1},
        ]
    )
    assert fb.clicks == [Click("a", "i7", 3), Click("c", "i1", 1)]
    assert fb.labels == [("b", 0)]
    assert sorted(fb.request_ids) == ["a", "b", "c"] and len(fb) == 3


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ({"request_id": "a", "position": 1}, "body.item_id must be the clicked item's id"),
        ({"request_id": "a", "item_id": "", "position": 1}, "body.item_id must be"),
        ({"request_id": "a", "item_id": "x" * 129, "position": 1}, "item_id is longer than 128"),
        ({"request_id": "a", "item_id": "i"}, "body.position must be the item's position as served"),
        ({"request_id": "a", "item_id": "i", "position": 0}, "from 1 (first) to 1000, got 0"),
        ({"request_id": "a", "item_id": "i", "position": 1001}, "got 1001"),
        ({"request_id": "a", "item_id": "i", "position": "1"}, "got '1'"),
        ({"request_id": "a", "item_id": "i", "position": True}, "got True"),
        ({"request_id": "a", "item_id": "i", "position": 2.0}, "got 2.0"),
        (
            {"request_id": "a", "item_id": "i", "position": 1, "label": 0},
            "body.label must be 1 (or left out)",
        ),
        ({"request_id": "a", "item_id": "i", "position": 1, "score": 1}, "unknown field(s): score"),
        ({"item_id": "i", "position": 1}, "body.request_id must be a non-empty string"),
    ],
)
def test_a_bad_click_is_refused_naming_the_field(item, words):
    with pytest.raises(InvalidRequest, match=None) as err:
        parse_feedback(item)
    assert words in str(err.value)


def test_one_request_cannot_get_a_label_and_a_click_in_one_body():
    with pytest.raises(InvalidRequest, match="both a label and a click"):
        parse_feedback([{"request_id": "a", "label": 1}, {"request_id": "a", "item_id": "i", "position": 1}])


def test_the_longest_servable_list_bounds_the_position():
    assert MAX_POSITION == MAX_CANDIDATES


# --- the check against the served list, and storage -------------------------
def seeded(engine, now: float) -> dict[str, str]:
    ids = {"rec": rid_at(now - 5), "pred": rid_at(now - 4)}
    with engine.begin() as conn:
        queries.insert_predictions(
            conn,
            [
                prediction(ids["rec"], now - 5, served=["i9", "i4", "i7"]),
                prediction(ids["pred"], now - 4, endpoint="predict"),
            ],
        )
    return ids


def stored(engine) -> dict:
    with engine.connect() as conn:
        q = select(labels.c.request_id, labels.c.label, labels.c.item_id, labels.c.position)
        return {r[0]: tuple(r[1:]) for r in conn.execute(q)}


def test_a_click_on_a_served_item_at_its_position_is_stored_as_the_request_s_label(engine):
    now = time.time()
    ids = seeded(engine, now)
    assert record_clicks(engine, [Click(ids["rec"], "i4", 2)], now) == 1
    assert stored(engine) == {ids["rec"]: (1, "i4", 2)}
    assert record_clicks(engine, [Click(ids["rec"], "i4", 2)], now + 1) == 0  # the same click: nothing new


@pytest.mark.parametrize(
    ("which", "item", "position", "error", "words"),
    [
        ("rec", "i5", 1, InvalidRequest, "'i5' was not served in the answer"),
        ("rec", "i7", 1, InvalidRequest, "was served at position 3"),
        ("pred", "i9", 1, InvalidRequest, "is a /predict answer: a click names an item of a /recommend"),
        ("unknown", "i9", 1, ClickNotLogged, "is in the prediction log yet"),
    ],
)
def test_a_click_that_does_not_match_the_served_list_is_refused_and_nothing_is_stored(
    engine, which, item, position, error, words
):
    now = time.time()
    ids = {**seeded(engine, now), "unknown": rid_at(now - 3)}
    good = Click(ids["rec"], "i9", 1)
    with pytest.raises(error) as err:
        record_clicks(engine, [good, Click(ids[which], item, position)], now)
    assert words in str(err.value)
    assert stored(engine) == {}  # all or nothing: the good click of the batch is not stored either


def test_a_request_keeps_its_first_outcome(engine):
    now = time.time()
    ids = seeded(engine, now)
    record_clicks(engine, [Click(ids["rec"], "i9", 1)], now)
    with pytest.raises(LabelConflict):  # another item: the first click is the outcome
        record_clicks(engine, [Click(ids["rec"], "i4", 2)], now + 1)
    with pytest.raises(LabelConflict):  # a plain negative label after the click
        record_labels(engine, [(ids["rec"], 0)], now + 2)
    assert stored(engine) == {ids["rec"]: (1, "i9", 1)}
    other = rid_at(now - 2)
    with engine.begin() as conn:
        queries.insert_predictions(conn, [prediction(other, now - 2, served=["a", "b"])])
    record_labels(engine, [(other, 0)], now)
    with pytest.raises(LabelConflict):  # a click after a negative label
        record_clicks(engine, [Click(other, "b", 2)], now + 1)


# --- the label job's ranking sums -------------------------------------------
def test_the_label_job_counts_exposures_and_the_positions_of_clicks_within_the_window(engine):
    t0 = 1_700_000_000.0
    served = [f"i{j}" for j in range(10)]
    rows, clicks = [], []
    for i in range(40):
        rid = rid_at(t0 + i)
        rows.append(prediction(rid, t0 + i, served=served))
        if i % 4 == 0:
            clicks.append((Click(rid, served[i % 10], i % 10 + 1), t0 + i + 5))  # within the window
        elif i % 4 == 1:
            clicks.append((Click(rid, served[0], 1), t0 + i + WINDOW_S + 1))  # after it: not counted
    predicts = [prediction(rid_at(t0 + i), t0 + i, endpoint="predict") for i in range(10)]
    with engine.begin() as conn:
        queries.insert_predictions(conn, rows + predicts)
    for click, at in clicks:
        record_clicks(engine, [click], at)
    queries.close_label_windows(engine, window_s=WINDOW_S, now=t0 + 200, settle_s=0, start_at=t0)
    with engine.connect() as conn:
        lab = queries.SqlMetricsSource(conn).labels(t0, t0 + 100, WINDOW_S, version=1)[None]
    assert lab.closed == 50 and lab.ranked == 40  # /predict rows are labelled but not exposures
    counted = [i % 10 + 1 for i in range(40) if i % 4 == 0]
    assert dict(zip(lab.click_positions.bins.tolist(), lab.click_positions.counts.tolist(), strict=True)) == {
        p: counted.count(p) for p in set(counted)
    }
    mrr = metric_sums(Metric.MRR, lab.ranked, lab.click_positions, 10)
    assert mrr.sum == pytest.approx(sum(1 / p for p in counted)) and mrr.n == 40
    assert lab.positives == len(counted)  # late clicks are stored but never counted


# --- /feedback ----------------------------------------------------------------
@pytest.fixture
def client(engine, tmp_path):
    ctx = make_context(make_settings(tmp_path / "state", str(engine.url)), engine)
    return create_app(ctx=ctx).test_client()


def test_feedback_stores_a_click_and_answers_4xx_naming_a_bad_one(client, engine):
    now = time.time()
    ids = seeded(engine, now)
    ok = client.post(
        "/feedback", json={"request_id": ids["rec"], "item_id": "i7", "position": 3}, headers=LABEL_HEADERS
    )
    assert ok.status_code == 200, ok.get_json()
    assert ok.get_json() == {"accepted": 1, "clicks": 1, "new_clicks": 1, "stored": "stored"}
    wrong = client.post(
        "/feedback", json={"request_id": ids["pred"], "item_id": "i7", "position": 3}, headers=LABEL_HEADERS
    )
    assert wrong.status_code == 400 and "/predict answer" in wrong.get_json()["error"]
    late = client.post(
        "/feedback", json={"request_id": rid_at(now), "item_id": "i7", "position": 3}, headers=LABEL_HEADERS
    )
    assert late.status_code == 409 and "send the click again" in late.get_json()["error"]
    forged = client.post(
        "/feedback", json={"request_id": "made-up", "item_id": "i7", "position": 3}, headers=LABEL_HEADERS
    )
    assert forged.status_code == 400 and "not issued by this system" in forged.get_json()["error"]
    assert stored(engine) == {ids["rec"]: (1, "i7", 3)}
