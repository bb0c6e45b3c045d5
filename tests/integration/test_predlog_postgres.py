"""The prediction log against the real Postgres: an outage mid-run loses and duplicates nothing."""

from __future__ import annotations

import json
import math
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import func, select

from bentos.predlog import PredictionLogWriter, row_from_dict
from control_plane.db.schema import predictions
from tests.conftest import free_port
from tests.integration._tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def via_port(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urlsplit(url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def row(request_id: str) -> tuple:
    """A row as a Bento logs it."""
    return row_from_dict(record(request_id))


def record(request_id: str) -> dict:
    """A row as a JSON object, column name -> value."""
    return {
        "request_id": request_id,
        "ts": time.time(),
        "model_version": 9,
        "role": "canary",
        "route": "weighted",
        "endpoint": "predict",
        "features": [0.125] * 16,
        "score": 0.5,
        "latency_ms": 1.0,
        "status": 200,
        "user_key": None,
        "served": None,
        "pair_key": None,
    }


def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def count_ids(engine, ids: list[str]) -> tuple[int, int]:
    with engine.connect() as conn:
        total, distinct = conn.execute(
            select(func.count(), func.count(func.distinct(predictions.c.request_id))).where(
                predictions.c.request_id.in_(ids)
            )
        ).one()
    return total, distinct


def test_rows_written_during_an_outage_arrive_exactly_once(pg_url, pg_engine, tmp_path):
    upstream = urlsplit(pg_url)
    proxy = TcpProxy(free_port(), (upstream.hostname, upstream.port or 5432)).start()
    w = PredictionLogWriter(
        via_port(pg_url, proxy.port), tmp_path / "spill", flush_interval_s=0.05, retry_interval_s=0.3
    ).start()
    prefix = uuid.uuid4().hex[:8]
    before = [f"{prefix}-before-{i}" for i in range(200)]
    during = [f"{prefix}-during-{i}" for i in range(300)]
    after = [f"{prefix}-after-{i}" for i in range(200)]
    try:
        for rid in before:
            w.log(row(rid))
        wait_until(lambda: count_ids(pg_engine, before)[0] == 200)

        proxy.stop()
        for rid in during:
            w.log(row(rid))
            time.sleep(0.001)
        wait_until(lambda: w.stats().rows_spilled == 300)
        stats = w.stats()
        assert not stats.db_up and stats.write_failures >= 1 and stats.spill_rows == 300
        assert count_ids(pg_engine, during) == (0, 0)

        proxy.start()
        for rid in after:
            w.log(row(rid))
        wait_until(lambda: count_ids(pg_engine, before + during + after)[0] == 700)
        w.close()
    finally:
        w.close()
        proxy.stop()

    assert count_ids(pg_engine, before + during + after) == (700, 700)
    stats = w.stats()  # rows logged while the writer was still backing off spill too
    assert stats.spill_rows == 0 and stats.rows_replayed == stats.rows_spilled >= 300
    assert not list((tmp_path / "spill").glob("predlog-*.jsonl"))


def test_replaying_rows_already_in_postgres_inserts_nothing_twice(pg_url, pg_engine, tmp_path):
    ids = [f"dup-{uuid.uuid4().hex[:8]}-{i}" for i in range(50)]
    records = {rid: record(rid) for rid in ids}  # a replayed row is the very row (its ts too)
    with PredictionLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.02) as w:
        for rid in ids[:30]:
            w.log(row_from_dict(records[rid]))
    spill = tmp_path / "spill" / "predlog-deadhost-1-1-0001.jsonl"
    spill.parent.mkdir(parents=True, exist_ok=True)
    spill.write_text("".join(json.dumps(records[rid]) + "\n" for rid in ids))  # 30 already written, 20 new
    with PredictionLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.02) as w2:
        wait_until(lambda: w2.stats().rows_replayed == 50)
    assert count_ids(pg_engine, ids) == (50, 50)
    assert not spill.exists()


def test_copy_writes_every_value_back_exactly_nulls_and_escapes_included(pg_url, pg_engine, tmp_path):
    tag = uuid.uuid4().hex[:8]
    odd = {
        **record(f"odd-{tag}-tab\there\\back\nline\r"),
        "features": None,
        "score": None,
        "status": 500,
        "role": "can\\ary",
        "user_key": "k\\ey\tof a user",
        "served": ["tab\there", "back\\slash", 'quo"te', "new\nline\r", "üñí"],
        "pair_key": "pa\\ir\tkey",
    }
    plain = {
        **record(f"plain-{tag}"),
        "features": [0.1 * i for i in range(16)],
        "score": 0.123456789012345678,
        "user_key": "0123456789abcdef0123456789abcdef",
        "served": ["i1", "i2"],
        "pair_key": "0123456789abcdef0123456789abcdef",
    }
    tiny = {**record(f"tiny-{tag}"), "ts": 1e22, "score": 5e-324, "latency_ms": 1e-7}
    infinite = {**record(f"inf-{tag}"), "score": float("-inf"), "latency_ms": float("inf")}
    nan = {**record(f"nan-{tag}"), "score": float("nan")}
    rows = [odd, plain, tiny, infinite, nan]
    with PredictionLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.02) as w:
        w.log_many([row_from_dict(r) for r in rows])
    assert w.stats().rows_written == 5 and w.stats().rows_rejected == 0
    with pg_engine.connect() as conn:
        got = {
            r["request_id"]: dict(r)
            for r in conn.execute(
                select(predictions).where(predictions.c.request_id.in_([r["request_id"] for r in rows]))
            ).mappings()
        }
    assert math.isnan(got[nan["request_id"]]["score"])
    got[nan["request_id"]]["score"] = nan["score"] = None  # NaN equals nothing, itself included
    assert got == {r["request_id"]: r for r in rows}


def test_a_row_postgres_refuses_is_set_aside_and_the_rest_of_its_batch_goes_in(pg_url, pg_engine, tmp_path):
    ids = [f"refuse-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    rows = [record(rid) for rid in ids]
    rows[2]["request_id"] = "x" * 200  # longer than the column allows
    with PredictionLogWriter(pg_url, tmp_path / "spill", flush_interval_s=0.5) as w:
        for r in rows:
            w.log(row_from_dict(r))
    assert w.stats().rows_rejected == 1 and w.stats().rows_written == 4
    assert count_ids(pg_engine, [ids[i] for i in (0, 1, 3, 4)]) == (4, 4)
    (rejected,) = (tmp_path / "spill").glob("rejected-*.jsonl")
    assert json.loads(rejected.read_text())["row"]["request_id"] == "x" * 200


def test_batches_with_and_without_rows_already_there_alternate_on_one_session(pg_url, pg_engine):
    # A fresh batch is COPYed straight in; one holding a row already there goes through the
    # temporary table. Either may follow the other on the same pooled database session.
    from bentos.predlog import copy_batch, default_engine_factory

    engine = default_engine_factory(pg_url)()
    conn = engine.raw_connection()  # one session, held as the writer holds it
    tag = uuid.uuid4().hex[:8]
    batches = [[f"alt-{tag}-{b}-{i}" for i in range(20)] for b in range(4)]
    made = {rid: row(rid) for b in batches for rid in b}  # a row sent again is the very row (its ts too)
    try:
        copy_batch(conn, [made[r] for r in batches[0]])
        copy_batch(conn, [made[r] for r in batches[0][:5] + batches[1]])  # 5 already there
        copy_batch(conn, [made[r] for r in batches[2]])
        copy_batch(conn, [made[r] for r in batches[2][-1:] + batches[3] + batches[1][:1]])
    finally:
        conn.close()
        engine.dispose()
    everything = [r for b in batches for r in b]
    assert count_ids(pg_engine, everything) == (80, 80)


def test_a_held_connection_that_died_while_idle_costs_no_spilled_batch(pg_url, pg_engine, tmp_path):
    # The writer keeps one connection from batch to batch instead of pinging a pooled one before
    # each; when that connection was closed under it (Postgres restarted, an idle timeout), the next
    # batch goes in on a new connection at once rather than being spilled and replayed later.
    from sqlalchemy import text

    name = f"predlog-{uuid.uuid4().hex[:8]}"
    url = f"{pg_url}{'&' if '?' in pg_url else '?'}application_name={name}"
    ids = [f"held-{name}-{i}" for i in range(100)]
    with PredictionLogWriter(url, tmp_path / "spill", flush_interval_s=0.02) as w:
        for rid in ids[:50]:
            w.log(row(rid))
        wait_until(lambda: w.stats().rows_written == 50)
        with pg_engine.begin() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :n"
                ),
                {"n": name},
            ).scalar_one()
        assert killed == 1  # the writer held exactly one connection
        for rid in ids[50:]:
            w.log(row(rid))
        wait_until(lambda: w.stats().rows_settled == 100)
        stats = w.stats()
    assert count_ids(pg_engine, ids) == (100, 100)
    assert (stats.rows_written, stats.rows_spilled, stats.write_failures) == (100, 0, 0)
