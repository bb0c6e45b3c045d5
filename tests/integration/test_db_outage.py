"""Postgres cut for 30 seconds while predictions flow: served anyway, logged exactly once, outage reported.

The cheaper of the two set-ups the issue allows: one real `bentoml serve` (the canary) and the control
plane's app and scheduled job in this process, all reaching a fresh Postgres database through a TCP proxy
that the test cuts. The baseline and control are fake ready endpoints (their rows are inserted directly).
Bound: 30 s outage at ~20 requests/s (about 800 requests); every one must be a 200.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from sqlalchemy import func, select

from control_plane import jobs, services
from control_plane.analysis.types import Phase
from control_plane.db.engine import make_engine
from control_plane.db.schema import decisions, predictions
from control_plane.log_backlog import HttpLogBacklog
from control_plane.web import create_app
from tests.conftest import fresh_database, wait_for
from tests.integration._canary_world import baseline_rows, canary_world, steady_load, unrecorded_ticks_cleared

pytestmark = pytest.mark.integration

OUTAGE_S = 30
RATE_PER_S = 20
INTERVAL_S = 5  # the schedule's interval for the evaluations this test runs by hand


@pytest.fixture(scope="module")
def database():
    """A brand-new Postgres database of this module's own, migrated, dropped at the end."""
    with fresh_database("recsys_outage") as url:
        yield url


@pytest.fixture(scope="module")
def world(tmp_path_factory, database, redis_url_module):
    """Versions 1 (baseline) and 2 (canary) registered; v2 served by `bentoml serve`, all through the proxy."""
    with canary_world(tmp_path_factory.mktemp("outage"), database, redis_url_module) as w:
        yield w.ctx, w.proxy, w.bento, w.work


@pytest.fixture(scope="module")
def redis_url_module():
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/8"
    with unrecorded_ticks_cleared(url):
        yield url


def canary_rows(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(predictions).where(predictions.c.request_id.like("outage-%"))
        ).scalar_one()


def run_tick(monkeypatch, ctx) -> dict | None:
    """The scheduled job as the worker runs it (the worker's context is this test's)."""
    monkeypatch.setattr(jobs, "_ctx", ctx)
    return jobs.evaluate_job(INTERVAL_S)


def test_a_30_second_database_outage_under_load(world, database, monkeypatch):
    ctx, proxy, bento, work = world
    direct = make_engine(database)
    app = create_app(ctx=ctx).test_client()
    rng = np.random.default_rng(0)
    policy = {"steps": [50], "step_min_duration_s": 3600, "p99_ratio": 10.0}  # holds: it never acts here
    rollout = services.start_canary(ctx, 2, policy, actor="test")
    with steady_load(bento, RATE_PER_S, "outage") as warmup:
        time.sleep(3)
    baseline_rows(direct, [a.t for a in warmup.answers], rng)
    wait_for(lambda: canary_rows(direct) >= len(warmup.answers), 20, "warm-up rows")
    before = run_tick(monkeypatch, ctx)
    assert before["action"] == "hold", before

    with steady_load(bento, RATE_PER_S, "outage") as traffic:
        time.sleep(5)
        proxy.stop()
        cut_at = time.time()
        try:
            # The control plane says so, naming the database but not its password.
            ready = app.get("/readyz")
            assert ready.status_code == 503 and "is not reachable" in ready.get_json()["error"]
            assert urlsplit(database).password is None or urlsplit(database).password not in ready.get_data(
                as_text=True
            )
            assert app.get("/api/rollouts").status_code == 503
            # The scheduled evaluation during the outage decides nothing and is not lost.
            outage_at = cut_at + 2 * INTERVAL_S
            wait_for(lambda: time.time() >= outage_at, 3 * INTERVAL_S, "a tick inside the outage")
            during = run_tick(monkeypatch, ctx)
            outage_tick = during["tick"]
            assert (
                during
                == {"tick": outage_tick, "action": "no_data", "recorded": False, "reason": during["reason"]}
                and "database was unreachable" in during["reason"]
            )
            wait_for(lambda: any((work / "spill").glob("predlog-*.jsonl")), 10, "rows spilled to disk")
            # The Bento says it holds rows to replay: what keeps the first tick after the outage from deciding.
            spilled = wait_for(lambda: HttpLogBacklog().waiting({2: bento}), 10, "the backlog on /metrics")
            assert spilled[0].version == 2 and spilled[0].rows > 0 and spilled[0].bytes > 0, spilled
            time.sleep(max(0.0, cut_at + OUTAGE_S - time.time()))
        finally:
            proxy.start()
        restored_at = time.time()
        time.sleep(5)
    assert restored_at - cut_at >= OUTAGE_S

    # Predictions kept being served: no added errors.
    statuses = [a.status for a in traffic.answers]
    in_outage = [a.status for a in traffic.answers if cut_at <= a.t < restored_at]
    assert len(in_outage) >= OUTAGE_S * RATE_PER_S * 0.5, f"only {len(in_outage)} requests during the outage"
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}

    # Every 2xx prediction is exactly one row once the spill files are replayed; nothing else is.
    assert {a.status for a in warmup.answers} == {200}
    served = {a.request_id for a in warmup.answers + traffic.answers if a.status == 200}

    def rows_by_id():
        with direct.connect() as conn:
            return dict(
                conn.execute(
                    select(predictions.c.request_id, func.count())
                    .where(predictions.c.request_id.like("outage-%"))
                    .group_by(predictions.c.request_id)
                ).all()
            )

    rows = wait_for(
        lambda: (r := rows_by_id()) and set(r) >= served and r, 60, "every served row in Postgres"
    )
    assert set(rows) == served and set(rows.values()) == {1}
    assert not any((work / "spill").glob("predlog-*.jsonl")), "spill files replayed and removed"
    wait_for(lambda: HttpLogBacklog().waiting({2: bento}) == [], 10, "no backlog left on /metrics")
    print(
        f"\n{OUTAGE_S} s outage: {len(in_outage)} requests served during it, {len(statuses)} in all, "
        f"0 errors; every row in Postgres {time.time() - restored_at:.1f} s after it ended"
    )

    # The control plane is ready again; the next tick records the outage's tick as "no data", then evaluates.
    assert app.get("/readyz").status_code == 200
    baseline_rows(direct, [a.t for a in traffic.answers], rng)  # the baseline's half of the same traffic
    after = run_tick(monkeypatch, ctx)
    assert after is not None and after["action"] == "hold", after
    with direct.connect() as conn:
        ledger = [
            dict(r._mapping)
            for r in conn.execute(
                select(decisions)
                .where(decisions.c.rollout_id == rollout.id, decisions.c.tick.is_not(None))
                .order_by(decisions.c.tick)
            )
        ]
    by_tick = {d["tick"]: d for d in ledger}
    assert len(by_tick) == len(ledger), "one row per tick"
    gap = by_tick[outage_tick]
    assert (
        gap["action"] == "no_data"
        and gap["actor"] == "scheduler"
        and gap["phase_after"] == gap["phase_before"]
    )
    assert "database was unreachable" in gap["reason"] and gap["metrics"] == {} and gap["rules"] == []
    assert "running_p_values" in gap["stats"], "the running p-values carry over the gap"
    assert [d["action"] for d in ledger] == ["hold", "no_data", "hold"], [d["reason"] for d in ledger]
    for prev, row in zip(ledger, ledger[1:], strict=False):  # ticks in between show as missed, not lost
        assert (row["stats"] or {}).get("missed_ticks", 0) == (row["tick"] - prev["tick"]) // INTERVAL_S - 1
    assert ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING
    services.rollback_now(ctx, rollout.id, actor="test", reason="test")
    direct.dispose()
