"""An evaluation's reads see one snapshot: rows committed while it reads are not half counted."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, insert, select

from control_plane.db.engine import make_engine, migrate, read_snapshot
from control_plane.db.schema import predictions


def _row(rid: str) -> dict:
    return {
        "request_id": rid,
        "ts": 1.0,
        "model_version": 1,
        "role": "baseline",
        "route": "weighted",
        "endpoint": "predict",
        "features": None,
        "score": 0.5,
        "latency_ms": 1.0,
        "status": 200,
    }


def count(conn) -> int:
    return conn.execute(select(func.count()).select_from(predictions)).scalar()


def check_snapshot(engine) -> None:
    tag = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(insert(predictions), [_row(f"{tag}-a")])
    with read_snapshot(engine) as snap:
        before = count(snap)
        with engine.begin() as writer:  # another writer commits while the evaluation reads
            writer.execute(insert(predictions), [_row(f"{tag}-b"), _row(f"{tag}-c")])
        assert count(snap) == before
    with engine.connect() as conn:
        assert count(conn) == before + 2


def test_sqlite_reads_inside_one_snapshot(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        check_snapshot(engine)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_postgres_reads_inside_one_snapshot(pg_url):
    engine = make_engine(pg_url)
    try:
        check_snapshot(engine)
    finally:
        engine.dispose()
