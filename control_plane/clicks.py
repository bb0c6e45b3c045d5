"""Clicks on `/recommend` answers: parsed, checked against the served list, stored as the request's label.

A click is a `/feedback` item `{"request_id", "item_id", "position"}` (optionally `"label": 1`): the
request id of a `/recommend` answer, the id of the item clicked and its 1-based position in the list as
served. It is checked against the list the Bento logged with the answer (`predictions.served`): the item
must have been served, at that position; a click on a `/predict` answer is refused. Each refusal is a
4xx naming the problem. A click is stored in `labels` as the request's positive label with the item and
its position, so it closes with the request's attribution window like any label (queries.py), and the
label job adds its position to the ranking sums (analysis/ranking.py).

A request's first label is its outcome (docs/labels.md): the same click again changes nothing; a click
on a request that already has another label or another click is refused (409).

A click needs the served list, so it needs the database: while the database is unreachable `/feedback`
answers 503 for it and the client sends it again (plain labels are spilled instead: labels.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select

from control_plane.analysis.aggregates import RANKED_ENDPOINT
from control_plane.analysis.ranking import MAX_POSITION
from control_plane.db.schema import labels, predictions
from control_plane.errors import InvalidRequest, LabelConflict, RecsysError
from control_plane.labels import MAX_ID_LEN, feedback_items, parse_label, request_id_of
from control_plane.queries import ISSUE_SLACK_S
from control_plane.request_ids import issued_at

CLICK_FIELDS = frozenset({"request_id", "item_id", "position", "label"})


@dataclass(frozen=True)
class Click:
    """One click: which `/recommend` answer, which item, at which 1-based position as served."""

    request_id: str
    item_id: str
    position: int


@dataclass(frozen=True)
class Feedback:
    """A /feedback body: plain labels (request id, 0 or 1) and clicks, each request at most once."""

    labels: list[tuple[str, int]]
    clicks: list[Click]

    @property
    def request_ids(self) -> list[str]:
        return [rid for rid, _ in self.labels] + [c.request_id for c in self.clicks]

    def __len__(self) -> int:
        return len(self.labels) + len(self.clicks)


class ClickNotLogged(RecsysError):
    """The answer a click names is not in the prediction log (yet): the log lags the answer by a second or
    two, so the client may send the click again."""

    http_status = 409


def is_click(item: Any) -> bool:
    return isinstance(item, dict) and ("item_id" in item or "position" in item)


def parse_click(item: dict, where: str) -> Click:
    """One click item; InvalidRequest naming the field that is wrong."""
    extra = set(item) - CLICK_FIELDS
    if extra:
        raise InvalidRequest(f"{where} has unknown field(s): {', '.join(sorted(extra))}")
    rid = request_id_of(item, where)
    item_id, position = item.get("item_id"), item.get("position")
    if not isinstance(item_id, str) or not item_id:
        raise InvalidRequest(f"{where}.item_id must be the clicked item's id (a non-empty string)")
    if len(item_id) > MAX_ID_LEN:
        raise InvalidRequest(f"{where}.item_id is longer than {MAX_ID_LEN} characters")
    if isinstance(position, bool) or not isinstance(position, int) or not 1 <= position <= MAX_POSITION:
        raise InvalidRequest(
            f"{where}.position must be the item's position as served, an integer from 1 (first) to "
            f"{MAX_POSITION}, got {position!r}"
        )
    label = item.get("label", 1)
    if isinstance(label, bool) or label != 1:
        raise InvalidRequest(f"{where}.label must be 1 (or left out) for a click, got {label!r}")
    return Click(rid, item_id, position)


def parse_feedback(body: Any) -> Feedback:
    """Labels and clicks of a /feedback body; a request named twice keeps its last item (as labels do),
    but one request may not get both a label and a click in one body."""
    items, listed = feedback_items(body)
    plain: dict[str, int] = {}
    clicks: dict[str, Click] = {}
    for i, item in enumerate(items):
        where = f"labels[{i}]" if listed else "body"
        if is_click(item):
            click = parse_click(item, where)
            clicks[click.request_id] = click
        else:
            rid, label = parse_label(item, where)
            plain[rid] = label
    both = sorted(set(plain) & set(clicks))
    if both:
        raise InvalidRequest(
            f"request id {both[0][:80]!r} has both a label and a click in this body: send one of them"
        )
    return Feedback(list(plain.items()), list(clicks.values()))


@dataclass(frozen=True)
class Served:
    """What the log holds of an answer: its endpoint and the item ids it served (None for /predict)."""

    endpoint: str
    items: list[str] | None


def served_lists(conn: Connection, request_ids: Iterable[str]) -> dict[str, Served]:
    """The logged answers of `request_ids`: one query, each id bounded by its issue time so that on
    Postgres only the partitions of those hours are read."""
    p = predictions
    conds = []
    for rid in set(request_ids):
        at = issued_at(rid)
        cond = p.c.request_id == rid
        if at is not None:
            cond = and_(cond, p.c.ts >= at - ISSUE_SLACK_S, p.c.ts < at + ISSUE_SLACK_S)
        conds.append(cond)
    if not conds:
        return {}
    rows = conn.execute(select(p.c.request_id, p.c.endpoint, p.c.served).where(or_(*conds))).all()
    return {rid: Served(endpoint, served) for rid, endpoint, served in rows}


def check_click(click: Click, served: Served | None) -> None:
    """Raise naming the problem unless `click` names an item of a logged /recommend answer at its position."""
    rid = click.request_id[:80]
    if served is None:
        raise ClickNotLogged(
            f"no answer with request id {rid!r} is in the prediction log yet (it reaches the log within a "
            "few seconds of the answer): send the click again shortly"
        )
    if served.endpoint != RANKED_ENDPOINT:
        raise InvalidRequest(
            f"request id {rid!r} is a /{served.endpoint} answer: a click names an item of a /recommend "
            "answer; label a /predict answer with {'request_id': ..., 'label': 0 or 1}"
        )
    items = served.items or []
    if click.item_id not in items:
        raise InvalidRequest(
            f"item_id {click.item_id[:80]!r} was not served in the answer {rid!r} "
            f"({len(items)} item(s) served): a click names one of the items the answer listed"
        )
    at = items.index(click.item_id) + 1
    if at != click.position:
        raise InvalidRequest(
            f"item_id {click.item_id[:80]!r} was served at position {at} in the answer {rid!r}, "
            f"not {click.position}: position is 1 for the first item served"
        )


def record_clicks(engine: Engine, clicks: list[Click], now: float | None = None) -> int:
    """Check `clicks` against their served lists and store them as labels; returns how many were new.

    All or nothing: the first click that fails its check raises (4xx), and a click on a request that
    already has another outcome raises LabelConflict (409); then nothing of the batch is stored.
    """
    ts = time.time() if now is None else now
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    with engine.begin() as conn:
        served = served_lists(conn, (c.request_id for c in clicks))
        for click in clicks:
            check_click(click, served.get(click.request_id))
        stored = {
            rid: (label, item_id, position)
            for rid, label, item_id, position in conn.execute(
                select(labels.c.request_id, labels.c.label, labels.c.item_id, labels.c.position).where(
                    labels.c.request_id.in_([c.request_id for c in clicks])
                )
            )
        }
        conflicts = [
            c.request_id
            for c in clicks
            if c.request_id in stored and stored[c.request_id] != (1, c.item_id, c.position)
        ]
        if conflicts:
            raise LabelConflict(conflicts)
        rows = [
            {"request_id": c.request_id, "label": 1, "ts": ts, "item_id": c.item_id, "position": c.position}
            for c in clicks
            if c.request_id not in stored
        ]
        if rows:  # two writers at once: the first insert wins (labels.py)
            stmt = insert(labels).on_conflict_do_nothing()
            conn.execute(stmt.returning(labels.c.request_id), rows).all()
    return len(rows)
