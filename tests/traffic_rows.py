"""Synthetic served traffic for tests that drive the control plane without Bentos: rows as the split says."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import yaml
from sqlalchemy import insert

from control_plane import queries
from control_plane.db.schema import labels

# A policy for tests that feed a few thousand rows: no step minimum, small samples.
FAST_POLICY = {
    "step_min_duration_s": 0,
    "min_labelled_per_arm": 200,
    "min_requests_per_arm": 50,
    "min_latency_samples": 100,
    "expected_n": 2000,
    "harm_expected_n": 200,
}


def traefik_split(ctx) -> dict[int, int]:
    """version -> weight in the weighted service of the Traefik file the router wrote."""
    doc = yaml.safe_load(Path(ctx.router.path).read_text())
    return {
        int(e["name"].split("-v")[1]): e["weight"]
        for e in doc["http"]["services"]["recsys-split"]["weighted"]["services"]
    }


def served_row(rid: str, ts: float, version: int, score: float, latency_ms: float, error: bool) -> dict:
    """A `predictions` row of Traefik's weighted split: a 5xx has no score."""
    return {
        "request_id": rid,
        "ts": ts,
        "model_version": version,
        "role": "x",
        "route": "weighted",
        "endpoint": "predict",
        "features": None,
        "score": None if error else score,
        "latency_ms": latency_ms,
        "status": 500 if error else 200,
    }


def feed(ctx, n: int, accuracy: dict[int, float], rng, error_rate: dict[int, float] | None = None) -> None:
    """n weighted requests split as the Traefik file says, stamped within the last second, each 2xx labelled.

    A version answers correctly with probability `accuracy[version]` and fails (5xx, no score, no label)
    with probability `error_rate[version]`.
    """
    error_rate = error_rate or {}
    now = time.time()
    preds, labs = [], []
    for version, weight in traefik_split(ctx).items():
        for _ in range(n * weight // 100):
            rid = uuid.uuid4().hex
            err = rng.random() < error_rate.get(version, 0.0)
            score = float(rng.random())
            label = int(score >= 0.5) if rng.random() < accuracy[version] else int(score < 0.5)
            preds.append(served_row(rid, now - rng.random(), version, score, 4 + rng.random(), err))
            if not err:  # the label arrives with its prediction: within any attribution window
                labs.append({"request_id": rid, "label": label, "ts": preds[-1]["ts"]})
    with ctx.engine.begin() as conn:
        queries.insert_predictions(conn, preds)
        conn.execute(insert(labels), labs)
