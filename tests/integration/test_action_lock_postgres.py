"""The action lock on the real Postgres: an advisory lock, named by its holder, gone with a dead holder."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import text

from control_plane.action_lock import ActionLock, PostgresAdvisoryLock, backend_for
from control_plane.db.engine import make_engine
from control_plane.errors import ActionBusy
from tests.action_lock_support import held_by_another_process, held_by_another_thread, take_turns

pytestmark = pytest.mark.integration


def test_another_process_waits_is_told_the_holder_and_gets_it_when_the_holder_dies(pg_url, pg_engine):
    assert isinstance(backend_for(pg_engine), PostgresAdvisoryLock)
    holder = held_by_another_process(pg_url, "start_canary by ui")
    try:
        busy = ActionLock(pg_engine, wait_s=0.3)
        with (
            pytest.raises(ActionBusy, match=r"start_canary by ui, backend pid \d+, for \d+ s"),
            busy.held("evaluate by scheduler"),
        ):
            pass
        holder.send_signal(signal.SIGKILL)  # no unlock: its connection's end releases the lock
        holder.wait(10)
        with ActionLock(pg_engine, wait_s=10).held("evaluate by scheduler"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_two_threads_take_turns_and_the_connection_goes_back_to_the_pool_clean(pg_engine):
    assert take_turns(ActionLock(pg_engine, wait_s=10)) == ["first done", "second in"]
    with pg_engine.connect() as conn:
        held = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar()
        name = conn.execute(text("SHOW application_name")).scalar()
    assert held == 0
    assert not name.startswith("recsys action")  # the name was the transaction's only


def test_a_lock_held_in_one_database_does_not_stop_actions_in_another(pg_url, pg_engine):
    other_db = make_engine(pg_url.rsplit("/", 1)[0] + "/test")
    try:
        with (
            ActionLock(pg_engine).held("deploy_role by cli"),
            ActionLock(other_db, wait_s=0.2).held("deploy_role by cli"),
        ):
            pass
    finally:
        other_db.dispose()


def test_a_scheduled_tick_that_waits_too_long_is_skipped_and_counted_by_the_next(
    pg_url, pg_engine, redis_url, tmp_path, monkeypatch
):
    from control_plane import jobs, services
    from tests.web_support import make_context, make_settings

    ctx = make_context(make_settings(tmp_path, pg_url, redis_url=redis_url, action_wait_s=0.2), pg_engine)
    monkeypatch.setattr(jobs, "_ctx", ctx)
    rollout = services.start_canary(ctx, 3, {"step_min_duration_s": 3600}, actor="test")
    assert jobs.evaluate_job(1)["action"] == "hold"
    with held_by_another_thread(ActionLock(pg_engine), "deploy_role by ui"):
        time.sleep(1.1)  # the next tick
        skipped = jobs.evaluate_job(1)
    assert skipped["action"] == "skipped" and skipped["recorded"] is False
    assert "deploy_role by ui" in skipped["reason"]
    time.sleep(1.1)
    assert jobs.evaluate_job(1)["action"] == "hold"
    last = ctx.ledger.decisions(rollout.id, limit=1)[0]
    assert last["stats"]["missed_ticks"] >= 1, last
