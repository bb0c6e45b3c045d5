"""`predictions` rows for tests that write the log without a Bento: built, written, read back as observations."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import Connection, Engine

from control_plane import observations, queries
from control_plane.analysis.types import Observations
from tests.web_support import SIGNER

PAIR_SETTLE_S = 2.0


def rid_at(ts: float) -> str:
    """A request id as a Bento issues it at `ts` (its fresh part begins with the time in ns)."""
    return SIGNER.issue(f"{int(ts * 1e9):016x}{uuid.uuid4().hex[:16]}")


def prediction(
    request_id: str,
    ts: float,
    *,
    version: int = 1,
    role: str = "baseline",
    route: str = "weighted",
    endpoint: str | None = None,
    score: float | None = 0.7,
    latency_ms: float = 3.0,
    status: int = 200,
    user_key: str | None = None,
    served: list[str] | None = None,
    pair_key: str | None = None,
) -> dict:
    """One row; the endpoint is /recommend when it served a list, else /predict, unless given."""
    return {
        "request_id": request_id,
        "ts": ts,
        "model_version": version,
        "role": role,
        "route": route,
        "endpoint": endpoint or ("recommend" if served else "predict"),
        "features": None,
        "score": score,
        "latency_ms": latency_ms,
        "status": status,
        "user_key": user_key,
        "served": served,
        "pair_key": pair_key,
    }


def paired_row(
    ts: float,
    version: int,
    route: str,
    score: float | None,
    pair_key: str | None,
    *,
    status: int = 200,
    latency: float = 5.0,
    served: list[str] | None = None,
    role: str = "baseline",
) -> dict:
    """A row of the shadow phase: a live answer or the shadow's copy, joined on `pair_key`."""
    return prediction(
        rid_at(ts),
        ts,
        version=version,
        role=role,
        route=route,
        score=score,
        latency_ms=latency,
        status=status,
        served=served,
        pair_key=pair_key,
    )


def settle_pairs(engine: Engine, now: float, *, start_at: float, window_s: float = 60.0) -> int:
    """The pair job at `now` for the shadow (v3) of the baseline (v2), the log settling PAIR_SETTLE_S."""
    return queries.sum_pairs(
        engine,
        shadow_version=3,
        baseline_version=2,
        window_s=window_s,
        now=now,
        settle_s=PAIR_SETTLE_S,
        start_at=start_at,
    )


def insert_rows(engine: Engine, rows: list[dict]) -> int:
    """Write `rows` as the writer does, in one transaction; returns how many went in."""
    with engine.begin() as conn:
        return queries.insert_predictions(conn, rows)


def read_step(
    conn: Connection,
    *,
    versions: Mapping[str, int],
    since: float,
    now: float,
    label_window_s: float,
    step_weights: Mapping[str, int],
    routes: Mapping[str, str] | None = None,
) -> Observations:
    """`observations.read_observations` over the SQL buckets, for one step that began at `since`."""
    return observations.read_observations(
        queries.SqlMetricsSource(conn),
        versions=versions,
        since=since,
        step_since=since,
        now=now,
        label_window_s=label_window_s,
        step_weights=step_weights,
        routes=routes,
    )
