"""The control loop's machinery under faults, for real: supervisord running the stack's own Redis, rq worker
and scheduler programs (control_plane.stack.programs) against real Postgres and MLflow, fake Bentos.

- A work horse killed between the Traefik write and the MLflow alias move: the next tick completes the
  half-done promotion, and Traefik and MLflow agree again.
- Redis stopped and restarted empty: the worker and scheduler come back (reconnecting, or restarted by
  supervisord), evaluations resume, no tick is evaluated twice, and the ledger shows the gap.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
from redis import Redis
from rq.registry import FailedJobRegistry
from sqlalchemy import select

from control_plane import services
from control_plane.analysis.types import Phase
from control_plane.context import bootstrap
from control_plane.db.schema import decisions
from control_plane.jobs import QUEUE, schedule_evaluations
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.settings import Settings
from control_plane.stack import programs
from control_plane.stack.local import _redis_up, create_secrets
from control_plane.supervisor import Supervisor
from control_plane.traffic_ops import apply_assignment
from tests.conftest import free_port, ready_servers, wait_for
from tests.fault_worker import FLAG_ENV
from tests.traffic_rows import FAST_POLICY, feed, traefik_split

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Small samples, one-second ticks; a single step so that the first conclusive evaluation promotes.
POLICY = {**FAST_POLICY, "steps": [50], "label_window_s": 0}


@pytest.fixture(scope="module")
def loop(tmp_path_factory, pg_url):
    """supervisord with redis, worker and scheduler as `recsys up` defines them; fake ready Bentos 1-3."""
    from training.train import train_and_register

    work = tmp_path_factory.mktemp("loop")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    for profile in ("control", "baseline", "better"):
        train_and_register(
            tracking_uri=uri,
            artifact_location=str(work / "art"),
            profile=profile,
            n_rows=400,  # the models' quality does not matter here: the test feeds the outcomes
            iterations=10,
            progress=False,
        )
    servers = ready_servers(3)
    bento_urls = ",".join(f"{v}=http://127.0.0.1:{s.server_address[1]}" for v, s in enumerate(servers, 1))
    fault_flag = work / "fault-after-traffic-write"
    env = {
        "RECSYS_STATE_DIR": str(work / "state"),
        "DATABASE_URL": pg_url,
        "MLFLOW_TRACKING_URI": uri,
        "RECSYS_BENTO_URLS": bento_urls,
        "RECSYS_EMBEDDED_REDIS_PORT": str(free_port()),
        "RECSYS_WORKER_METRICS_PORT": str(free_port()),
        "RECSYS_EVAL_INTERVAL_S": "1",
        "RECSYS_HARM_INTERVAL_S": "0",  # this test follows the scheduled ticks; the harm job has its own
        "RECSYS_LABEL_WINDOW_S": "0",
        "RECSYS_LOG_SETTLE_S": "0",  # `feed` writes every arm's rows at once: none is still arriving
    }
    (work / "state").mkdir(parents=True, exist_ok=True)
    settings = create_secrets(Settings.from_env(env))  # the embedded Redis' password and config file
    extra = {"RECSYS_BENTO_URLS": bento_urls}
    # The worker's jobs die once at the fault point while the flag exists (tests/fault_worker.py).
    worker = programs.worker(settings)
    worker = dataclasses.replace(
        worker,
        command=[c.replace(programs.WORKER_CLASS, "tests.fault_worker.FaultWorker") for c in worker.command],
        env={
            **worker.env,
            FLAG_ENV: str(fault_flag),
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        },
    )
    sup = Supervisor(settings.state_dir)
    sup.start()
    try:
        sup.add(programs.redis(settings))
        wait_for(lambda: _redis_up(settings.effective_redis_url), 30, "redis up")
        for program in (worker, programs.scheduler(settings)):
            sup.add(dataclasses.replace(program, env={**program.env, **extra}))
        schedule_evaluations(settings.effective_redis_url, 1)
        ctx = bootstrap(settings)
        ctx.drain_s = 0
        yield ctx, sup, fault_flag
        ctx.engine.dispose()
    finally:
        sup.shutdown()
        for srv in servers:
            srv.shutdown()


@pytest.fixture
def ctx(loop, pg_engine):
    """Empty tables; version 2 is the baseline at 95 %, version 1 the control at 5 %."""
    ctx, _, _ = loop
    for alias in ("baseline", "canary", "control", "previous_baseline"):
        ctx.registry.remove_alias(alias)
    ctx.registry.set_alias("control", 1)
    ctx.registry.set_alias("baseline", 2)
    apply_assignment(ctx, Assignment(baseline=Slot(2, 95), control=Slot(1, 5)))
    return ctx


def scheduled_rows(ctx, rollout_id: int) -> list[dict]:
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(decisions)
            .where(decisions.c.rollout_id == rollout_id, decisions.c.tick.is_not(None))
            .order_by(decisions.c.tick)
        )
        return [dict(r._mapping) for r in rows]


def test_a_worker_killed_between_the_traffic_write_and_the_alias_move_is_completed_by_the_next_tick(
    loop, ctx
):
    _, sup, fault_flag = loop
    fault_flag.write_text("armed")  # the work horse that reaches the fault point removes it and dies there
    redis = Redis.from_url(ctx.settings.effective_redis_url)
    failed_before = len(FailedJobRegistry(QUEUE, connection=redis))
    rollout = services.start_canary(ctx, 3, POLICY, actor="test")
    rng = np.random.default_rng(0)

    fed = []

    def promoted_and_settled():
        r = ctx.ledger.get(rollout.id)
        if r.phase is Phase.PROGRESSING and len(fed) < 120:
            # every step needs rows of its own: the novelty check judges the last step on its own data
            feed(ctx, 1500, {1: 0.7, 2: 0.7, 3: 0.9}, rng)
            fed.append(1)
        return r.phase is Phase.PROMOTED and r.pending_action is None

    # A step's rows count once their 5 s aggregate bucket is whole, so each step ends a bucket later than
    # it did on raw rows; 240 s leaves room for that on a loaded machine.
    wait_for(promoted_and_settled, 240, "promotion completed", every_s=1)
    assert not fault_flag.exists(), "the fault fired: a work horse died after the traffic write"
    assert len(FailedJobRegistry(QUEUE, connection=redis)) > failed_before, "rq saw its work horse die"
    log = (sup.log_dir / "worker.log").read_text()
    assert "fault injected: exiting at AFTER_TRAFFIC_WRITE" in log

    ledger = list(reversed(ctx.ledger.decisions(rollout.id)))
    actions = [(d["action"], d["actor"]) for d in ledger]
    assert ("promote", "scheduler") in actions and ("recover", "recovery") in actions, actions
    assert actions.index(("recover", "recovery")) > actions.index(("promote", "scheduler"))
    assert (
        "completed the half-applied promote action"
        in ledger[actions.index(("recover", "recovery"))]["reason"]
    )

    # Traefik and MLflow agree: version 3 serves as the baseline in both, version 2 is the previous one.
    assert traefik_split(ctx) == {3: 95, 1: 5}
    assert ctx.registry.version_for("baseline") == 3
    assert ctx.registry.get(3).stage == "Production"
    assert ctx.registry.version_for("previous_baseline") == 2
    assert ctx.registry.version_for("canary") is None
    assert ctx.traffic_store.load().versions == {
        "baseline": 3,
        "canary": None,
        "control": 1,
    }


def test_a_redis_outage_leaves_a_gap_in_the_ledger_not_a_double_or_a_silent_skip(loop, ctx):
    _, sup, _ = loop
    policy = {
        **POLICY,
        "steps": [10, 50],
        "step_min_duration_s": 3600,
    }  # holds: evaluates every tick, acts never
    rollout = services.start_canary(ctx, 3, policy, actor="test")
    feed(ctx, 300, {1: 0.7, 2: 0.7, 3: 0.7}, np.random.default_rng(1))
    wait_for(lambda: len(scheduled_rows(ctx, rollout.id)) >= 2, 20, "scheduled evaluations before the outage")

    rpc = sup.rpc().supervisor
    rpc.stopProcess("redis")
    stopped_at = time.time()
    time.sleep(6)
    rpc.startProcess("redis")  # empty: the embedded Redis keeps nothing on disk
    restarted_at = time.time()

    def resumed():
        return [r for r in scheduled_rows(ctx, rollout.id) if r["tick"] >= restarted_at + 1][:2]

    after = wait_for(
        resumed,
        60,
        "evaluations resumed after Redis came back empty (the scheduler program must register the periodic "
        "evaluation again: `python -m control_plane.jobs`, control_plane.jobs.run_scheduler)",
        every_s=1,
    )

    def states():
        procs = sup.processes()
        return {n: procs[n]["statename"] for n in ("redis", "worker", "scheduler")}

    # A worker restarted just before Redis came back serves at once but is STARTING for supervisord
    # until it has stayed up `startsecs` (2 s): wait out that window, not a crash loop or a FATAL.
    running = dict.fromkeys(("redis", "worker", "scheduler"), "RUNNING")
    wait_for(lambda: states() == running, 10, "every program RUNNING again")

    rows = scheduled_rows(ctx, rollout.id)
    ticks = [r["tick"] for r in rows]
    assert len(ticks) == len(set(ticks)), "a tick was evaluated twice"
    for prev, row in zip(rows, rows[1:], strict=False):
        gap = row["tick"] - prev["tick"] - 1
        assert (row["stats"] or {}).get("missed_ticks", 0) == gap, (prev["tick"], row["tick"], row["stats"])
        if gap:
            assert f"{gap} scheduled evaluations were missed before this one" in row["reason"]
    first_after = next(r for r in rows if r["tick"] > stopped_at)
    assert first_after["stats"]["missed_ticks"] >= 4, "the outage shows in the ledger"
    assert {r["action"] for r in rows} <= {"hold", "no_data"}, "nothing was decided"
    assert after
    services.rollback_now(ctx, rollout.id, actor="test", reason="test")
