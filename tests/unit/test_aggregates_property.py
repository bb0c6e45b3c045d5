"""The aggregates give the numbers the raw rows give: a property-based comparison on SQLite.

The same predictions (some written twice, in batches) and labels (in time, sent twice, late, missing,
changed after their window was counted) go to a raw-row reference written here from the rule's
definition, and through the production path: queries.insert_predictions (the writer's aggregates),
labels.record_labels, the label job (queries.close_label_windows, run twice and at two moments), and
the MetricsSource read by observations.read_observations.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane import queries
from control_plane.analysis.aggregates import BUCKET_S, RELATIVE_ACCURACY
from control_plane.db.engine import make_engine, migrate
from control_plane.errors import LabelConflict
from control_plane.labels import record_labels
from tests.prediction_rows import insert_rows, prediction, read_step

WINDOW_S = 30
T0 = 1_000_000.0  # a bucket boundary
SPAN_S = 120.0  # predictions over two minutes


@dataclass(frozen=True)
class Pred:
    rid: str
    ts: float
    version: int
    score: float | None
    latency_ms: float
    status: int


@dataclass(frozen=True)
class LabelEvent:
    rid: str
    label: int
    at: float  # arrival time


preds_strategy = st.lists(
    st.tuples(
        st.floats(0, SPAN_S - 0.001),
        st.sampled_from([1, 2]),
        st.floats(0, 1),
        st.floats(0.01, 5000.0),
        st.booleans(),  # a 5xx
    ),
    min_size=1,
    max_size=120,
)


@st.composite
def scenario(draw):
    raw = draw(preds_strategy)
    preds = [
        Pred(f"r{i}", T0 + t, v, None if err else s, lat, 503 if err else 200)
        for i, (t, v, s, lat, err) in enumerate(raw)
    ]
    before, after = [], []  # label events before the first count, and after it (late changes)
    for p in preds:
        kind = draw(st.sampled_from(["none", "in time", "in time, resent late", "changed in time", "late"]))
        first = draw(st.integers(0, 1))
        d1 = draw(st.floats(0, WINDOW_S))
        if kind in ("in time", "in time, resent late", "changed in time"):
            before.append(LabelEvent(p.rid, first, p.ts + d1))
        if kind == "changed in time":
            before.append(LabelEvent(p.rid, 1 - first, p.ts + draw(st.floats(d1, WINDOW_S))))
        if kind == "in time, resent late":  # a retry of the same label, after the window
            before.append(LabelEvent(p.rid, first, p.ts + WINDOW_S + draw(st.floats(0.5, 60))))
        if kind == "late":
            before.append(LabelEvent(p.rid, first, p.ts + WINDOW_S + draw(st.floats(0.5, 60))))
        if draw(st.booleans()):  # a label changed once the outcome was counted: stored, never counted
            after.append(LabelEvent(p.rid, draw(st.integers(0, 1)), p.ts + WINDOW_S + 500))
    dup = draw(st.lists(st.integers(0, len(preds) - 1), max_size=10))
    batch = draw(st.integers(1, 40))
    return preds, before, after, dup, batch


def reference(preds: list[Pred], events: list[LabelEvent], version: int, until: float, closed_before: float):
    """From the rule: every served prediction whose window closed is positive iff its first label (a
    request's first label is its outcome; a different one later is refused) arrived within its window
    and is 1."""
    mine = [p for p in preds if p.version == version and T0 <= p.ts < until]
    closed = [p for p in preds if p.version == version and p.status < 500 and T0 <= p.ts < closed_before]
    y = []
    for p in closed:
        mine_events = sorted((e for e in events if e.rid == p.rid), key=lambda e: e.at)
        first = mine_events[0] if mine_events else None
        y.append(1 if first and first.at <= p.ts + WINDOW_S and first.label == 1 else 0)
    scores = np.array([p.score for p in closed], dtype=float)
    y = np.array(y, dtype=int)
    correct = int(((scores >= 0.5) == (y == 1)).sum()) if len(y) else 0
    return mine, closed, scores, y, correct


def _store_labels(engine, events: list[LabelEvent]) -> None:
    for e in sorted(events, key=lambda e: e.at):
        with contextlib.suppress(LabelConflict):  # a different label after the first is refused
            record_labels(engine, [(e.rid, e.label)], now=e.at)


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    """An empty migrated database, copied for each example (a migration takes longer than an example)."""
    path = tmp_path_factory.mktemp("template") / "db.sqlite"
    migrate(f"sqlite:///{path}")
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario())
def test_the_aggregates_count_what_the_raw_rows_count(migrated, tmp_path_factory, case):
    preds, before, after, dup, batch = case
    path = tmp_path_factory.mktemp("agg") / "db.sqlite"
    shutil.copy(migrated, path)
    engine = make_engine(f"sqlite:///{path}")
    rows = [
        prediction(
            p.rid,
            p.ts,
            version=p.version,
            role="baseline" if p.version == 1 else "canary",
            score=p.score,
            latency_ms=p.latency_ms,
            status=p.status,
        )
        for p in preds
    ]
    written = rows + [rows[i] for i in dup]  # a replay writes some rows again
    with engine.begin() as conn:
        inserted = sum(
            queries.insert_predictions(conn, written[i : i + batch]) for i in range(0, len(written), batch)
        )
    assert inserted == len(preds)
    _store_labels(engine, before)
    now = T0 + SPAN_S + WINDOW_S + 100  # every window closed, none of the late changes stored yet
    for _ in range(2):  # the job run twice counts once
        queries.close_label_windows(engine, window_s=WINDOW_S, now=now, settle_s=0, start_at=T0)
    _store_labels(engine, after)
    later = now + 600
    queries.close_label_windows(engine, window_s=WINDOW_S, now=later, settle_s=0, start_at=T0)

    with engine.connect() as conn:
        obs = read_step(
            conn,
            versions={"baseline": 1, "canary": 2},
            since=T0,
            now=later,
            label_window_s=WINDOW_S,
            step_weights={"baseline": 50, "canary": 50},
        )
    until = math.floor(later / BUCKET_S) * BUCKET_S
    for role, version in (("baseline", 1), ("canary", 2)):
        arm = obs.arms[role]
        mine, closed, scores, y, correct = reference(preds, before, version, until, until)
        assert arm.requests == len(mine)
        assert arm.errors == sum(1 for p in mine if p.status >= 500)
        assert (arm.labelled, arm.correct) == (len(closed), correct)
        if closed:
            assert arm.accuracy == pytest.approx(correct / len(closed))
            p = np.clip(scores, 1e-7, 1 - 1e-7)
            assert arm.log_loss == pytest.approx(float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))))
        if 0 < y.sum() < len(y):
            exact = _rank_auc(scores, y)
            assert abs(arm.auc - exact) <= arm.auc_max_error + 1e-9
        lat = np.array([p.latency_ms for p in mine])
        for q in (0.5, 0.95, 0.99):
            if len(lat):
                truth = float(np.quantile(lat, q, method="inverted_cdf"))
                assert arm.latency.quantile(q) == pytest.approx(truth, rel=RELATIVE_ACCURACY + 1e-9)
    engine.dispose()


def _rank_auc(scores: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def test_a_second_run_of_the_label_job_at_the_same_time_counts_nothing(engine):
    rows = [prediction(f"r{i}", T0 + i, score=0.9) for i in range(100)]
    insert_rows(engine, rows)
    kw = {"window_s": WINDOW_S, "now": T0 + 200, "settle_s": 0, "start_at": T0}
    assert queries.close_label_windows(engine, **kw) == 100
    assert queries.close_label_windows(engine, **kw) == 0
    # Later, only what has closed since is read: the cost follows the newly closed predictions.
    insert_rows(engine, [{**r, "request_id": f"s{i}", "ts": T0 + 200 + i} for i, r in enumerate(rows[:10])])
    assert queries.close_label_windows(engine, **{**kw, "now": T0 + 300}) == 10
