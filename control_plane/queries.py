"""Where the numbers come from: every read of predictions and labels lives here."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from sqlalchemy import Connection, and_, case, func, select

from control_plane.analysis.types import ArmObservation, Observations
from control_plane.db.schema import labels, predictions

WEIGHTED = "weighted"


def _count_requests(conn: Connection, version: int, since: float, until: float) -> tuple[int, int]:
    p = predictions
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(case((p.c.status >= 500, 1), else_=0)), 0)).where(
            p.c.model_version == version, p.c.route == WEIGHTED, p.c.ts >= since, p.c.ts < until
        )
    ).one()
    return int(row[0]), int(row[1])


def _latencies(conn: Connection, version: int, since: float, until: float, limit: int) -> tuple[float, ...]:
    p = predictions
    rows = conn.execute(
        select(p.c.latency_ms)
        .where(p.c.model_version == version, p.c.route == WEIGHTED, p.c.ts >= since, p.c.ts < until)
        .order_by(p.c.ts.desc())
        .limit(limit)
    ).scalars()
    return tuple(float(x) for x in rows)


def _labelled(columns: list, version: int, since: float, closed_before: float):
    """SELECT `columns` over served predictions whose label arrived and whose label window has closed."""
    p, lab = predictions, labels
    return (
        select(*columns)
        .select_from(p.join(lab, lab.c.request_id == p.c.request_id))
        .where(
            p.c.model_version == version,
            p.c.route == WEIGHTED,
            p.c.status < 500,
            p.c.score.is_not(None),
            p.c.ts >= since,
            p.c.ts < closed_before,
        )
    )


def _labelled_pairs(conn: Connection, version: int, since: float, closed_before: float) -> np.ndarray:
    """(score, label) for served predictions whose label arrived and whose label window has closed."""
    rows = conn.execute(_labelled([predictions.c.score, labels.c.label], version, since, closed_before)).all()
    return np.asarray(rows, dtype=float).reshape(-1, 2)


def _labelled_counts(conn: Connection, version: int, since: float, closed_before: float) -> tuple[int, int]:
    """(labelled, correct) for the same predictions as `_labelled_pairs`, counted by the database."""
    p, lab = predictions, labels
    hit = case(
        (and_(p.c.score >= 0.5, lab.c.label == 1), 1), (and_(p.c.score < 0.5, lab.c.label == 0), 1), else_=0
    )
    columns = [func.count(), func.coalesce(func.sum(hit), 0)]
    row = conn.execute(_labelled(columns, version, since, closed_before)).one()
    return int(row[0]), int(row[1])


def window_ends(now: float, settle_s: float, label_window_s: float) -> tuple[float, float]:
    """Where a window's requests end, and where its labelled predictions end.

    Requests end `settle_s` short of now: each Bento's writer writes on its own clock, so the newest
    second or so holds some versions' rows and not yet others', which counted would look like a
    sample-ratio mismatch. Labelled predictions end there too, or earlier: where their label window
    has closed.
    """
    until = now - max(settle_s, 0.0)
    return until, min(until, now - label_window_s)


def window_counts(
    conn: Connection,
    *,
    versions: Mapping[str, int | None],
    since: float,
    now: float,
    label_window_s: float,
    settle_s: float = 0.0,
) -> dict[str, dict]:
    """Per role: requests, errors, labelled and correct over the window, as aggregates (cheap to scrape)."""
    until, labels_before = window_ends(now, settle_s, label_window_s)
    out = {}
    for role, version in versions.items():
        if version is None:
            continue
        requests, errors = _count_requests(conn, version, since, until)
        labelled, correct = _labelled_counts(conn, version, since, labels_before)
        out[role] = {
            "version": version,
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "labelled": labelled,
            "accuracy": correct / labelled if labelled else None,
        }
    return out


def log_loss(scores: np.ndarray, y: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(scores: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve by ranks (Mann-Whitney); None when one class is absent."""
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def arm_observation(
    conn: Connection,
    version: int | None,
    *,
    since: float,
    step_since: float,
    until: float,
    labels_before: float,
    max_latency_samples: int = 500_000,
) -> ArmObservation:
    """One version's window: counts and latencies up to `until`, label metrics up to `labels_before`."""
    if version is None:
        return ArmObservation(version=None, requests=0, errors=0, latencies_ms=(), labelled=0, correct=0)
    requests, errors = _count_requests(conn, version, since, until)
    step_requests, _ = _count_requests(conn, version, max(step_since, since), until)
    pairs = _labelled_pairs(conn, version, since, labels_before)
    scores, y = pairs[:, 0], pairs[:, 1]
    correct = int(((scores >= 0.5) == (y == 1)).sum())
    return ArmObservation(
        version=version,
        requests=requests,
        errors=errors,
        latencies_ms=_latencies(conn, version, since, until, max_latency_samples),
        labelled=len(y),
        correct=correct,
        log_loss=log_loss(scores, y),
        auc=auc(scores, y),
        step_requests=step_requests,
    )


def read_observations(
    conn: Connection,
    *,
    versions: Mapping[str, int | None],
    since: float,
    step_since: float,
    now: float,
    label_window_s: float,
    step_weights: Mapping[str, int],
    settle_s: float = 0.0,
) -> Observations:
    """Every role's window (its ends from `window_ends`), as the decision function takes it."""
    until, labels_before = window_ends(now, settle_s, label_window_s)
    arms = {
        role: arm_observation(
            conn, version, since=since, step_since=step_since, until=until, labels_before=labels_before
        )
        for role, version in versions.items()
    }
    return Observations(
        now=now, window_start=since, window_end=until, arms=arms, step_weights=dict(step_weights)
    )


def summarize(arm: ArmObservation) -> dict:
    """The numbers a person reads for one arm (the ledger and the API show these)."""
    lat = np.asarray(arm.latencies_ms, dtype=float)
    pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if len(lat) else (lambda q: None)
    return {
        "version": arm.version,
        "requests": arm.requests,
        "errors": arm.errors,
        "error_rate": round(arm.error_rate, 6),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "labelled": arm.labelled,
        "accuracy": None if arm.accuracy is None else round(arm.accuracy, 6),
        "log_loss": None if arm.log_loss is None else round(arm.log_loss, 6),
        "auc": None if arm.auc is None else round(arm.auc, 6),
    }


def timeseries(
    conn: Connection, *, since: float, now: float, bucket_s: int, label_window_s: float
) -> list[dict]:
    """Per time bucket and logged role: request rate, error rate, p99 latency and accuracy (for charts)."""
    p, lab = predictions, labels
    bucket = func.floor(p.c.ts / bucket_s).label("bucket")
    rows = conn.execute(
        select(bucket, p.c.role, p.c.latency_ms, p.c.status, p.c.score, lab.c.label)
        .select_from(p.outerjoin(lab, lab.c.request_id == p.c.request_id))
        .where(and_(p.c.ts >= since, p.c.ts < now, p.c.route == WEIGHTED))
    ).all()
    groups: dict[tuple[int, str], list] = {}
    for b, role, latency, status, score, label in rows:
        groups.setdefault((int(b), role), []).append((latency, status, score, label))
    out = []
    for (b, role), items in sorted(groups.items()):
        lat = np.array([i[0] for i in items], dtype=float)
        errors = sum(1 for i in items if i[1] >= 500)
        closed = (b + 1) * bucket_s <= now - label_window_s
        lab_items = [(s, y) for _, st, s, y in items if y is not None and s is not None and st < 500]
        acc = (
            sum(1 for s, y in lab_items if (s >= 0.5) == (y == 1)) / len(lab_items)
            if lab_items and closed
            else None
        )
        out.append(
            {
                "t": b * bucket_s,
                "role": role,
                "rps": round(len(items) / bucket_s, 3),
                "error_rate": round(errors / len(items), 6),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "accuracy": None if acc is None or math.isnan(acc) else round(acc, 6),
            }
        )
    return out


def prediction_count(conn: Connection, *, since: float = 0.0) -> int:
    return int(
        conn.execute(select(func.count()).select_from(predictions).where(predictions.c.ts >= since)).scalar()
    )
