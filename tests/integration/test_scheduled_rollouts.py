"""Real rq-scheduler and RQ worker processes evaluate a rollout on real Postgres, Redis and MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from control_plane import services
from control_plane.analysis.types import Phase
from control_plane.context import bootstrap
from control_plane.jobs import WORKER_SERIALIZER, schedule_evaluations
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.rollout_reading import SETTLE_S
from control_plane.settings import Settings
from control_plane.traffic_ops import apply_assignment
from tests.conftest import ready_servers
from tests.traffic_rows import FAST_POLICY, feed, traefik_split
from training.train import train_and_register

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
FAST = FAST_POLICY


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three small registered versions in a real MLflow store: control, baseline, better."""
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    for profile in ("control", "baseline", "better", "worse"):
        train_and_register(
            tracking_uri=uri,
            artifact_location=str(d / "art"),
            profile=profile,
            n_rows=2000,
            iterations=20,
            progress=False,
        )
    return uri


@pytest.fixture
def world(models, pg_url, pg_engine, redis_url, tmp_path):
    servers = ready_servers(4)
    urls = {v: f"http://127.0.0.1:{srv.server_address[1]}" for v, srv in enumerate(servers, 1)}
    env = {
        **os.environ,
        "RECSYS_STATE_DIR": str(tmp_path / "state"),
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "MLFLOW_TRACKING_URI": models,
        "RECSYS_BENTO_URLS": ",".join(f"{v}={u}" for v, u in urls.items()),
        "RECSYS_LABEL_WINDOW_S": "0",
        "RECSYS_LOG_SETTLE_S": "0",  # `feed` writes every arm's rows at once: none is still arriving
        "RECSYS_EVAL_INTERVAL_S": "1",
        "RECSYS_HARM_INTERVAL_S": "0",  # this test follows the scheduled ticks; the harm job has its own
    }
    settings = Settings.from_env(env)
    ctx = bootstrap(settings)
    ctx.drain_s = 0
    for alias in ("baseline", "canary", "control", "previous_baseline"):
        ctx.registry.remove_alias(alias)
    ctx.registry.set_alias("control", 1)
    ctx.registry.set_alias("baseline", 2)
    apply_assignment(ctx, Assignment(baseline=Slot(2, 95), control=Slot(1, 5)))
    with open(tmp_path / "proc.log", "ab") as log:
        procs = [
            subprocess.Popen(
                [str(BIN / "rq"), "worker", "--url", redis_url, "--serializer", WORKER_SERIALIZER, "recsys"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            subprocess.Popen(
                # rq-scheduler's loop with the JSON job classes (the plain `rqscheduler` would unpickle)
                [str(BIN / "python"), "-m", "control_plane.jobs", "--url", redis_url, "--interval-s", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
        ]
        yield ctx, env
        for p in procs:
            p.terminate()
            p.wait(15)
    for srv in servers:
        srv.shutdown()
    ctx.engine.dispose()


def run_until_done(ctx, env, rollout_id, accuracy, error_rate, timeout_s=90) -> Phase:
    # Windows count whole 5-second buckets, so each step's rows count up to 5 s later than they used to.
    # Traffic pauses for a while after each weight change: a step's sample-ratio check counts from
    # SETTLE_S after the change, because Traefik takes that long to follow it and requests served meanwhile
    # follow the old weights, while `feed` follows the file at once; rows stamped in between, at the new
    # weights, would count toward the step before and fail its sample-ratio check.
    schedule_evaluations(env["REDIS_URL"], 1)
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + timeout_s
    split, changed_at = None, 0.0
    while time.monotonic() < deadline:
        now_split = traefik_split(ctx)
        if now_split != split:
            split, changed_at = now_split, Path(ctx.router.path).stat().st_mtime
        if time.time() - changed_at >= SETTLE_S + 3:  # rows are stamped within the last second
            feed(ctx, 1500, accuracy, rng, error_rate)
        rollout = ctx.ledger.get(rollout_id)
        if rollout.phase.terminal and rollout.pending_action is None:  # decided, and the action applied
            return rollout.phase
        time.sleep(1)
    return ctx.ledger.get(rollout_id).phase


def test_scheduled_ticks_advance_a_better_canary_through_its_steps_and_promote_it(world):
    ctx, env = world
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    phase = run_until_done(ctx, env, rollout.id, {1: 0.7, 2: 0.7, 3: 0.9}, {})
    assert phase is Phase.PROMOTED, [
        (d["action"], d["reason"]) for d in ctx.ledger.decisions(rollout.id, limit=5)
    ]
    actions = [d["action"] for d in reversed(ctx.ledger.decisions(rollout.id))]
    assert actions.count("advance") == 2 and actions[-1] == "promote", actions
    assert all(d["actor"] == "scheduler" for d in ctx.ledger.decisions(rollout.id) if d["action"] != "start")
    assert ctx.registry.version_for("baseline") == 3, (
        ctx.registry._alias_map(),
        ctx.ledger.get(rollout.id).pending_action,
        [(d["action"], d["actor"]) for d in ctx.ledger.decisions(rollout.id)],
    )
    assert ctx.registry.get(3).stage == "Production"
    assert ctx.registry.version_for("previous_baseline") == 2
    assert ctx.registry.get(2).stage == "Archived"
    doc = yaml.safe_load(Path(ctx.router.path).read_text())
    split = {e["name"]: e["weight"] for e in doc["http"]["services"]["recsys-split"]["weighted"]["services"]}
    assert split == {"recsys-v3": 95, "recsys-v1": 5}
    last = ctx.ledger.decisions(rollout.id, limit=1)[0]
    assert last["metrics"]["canary"]["labelled"] >= FAST["min_labelled_per_arm"]
    assert last["stats"], "the numbers behind the promotion are in the ledger"


def test_a_canary_that_errors_is_rolled_back_at_its_first_evaluation(world):
    ctx, env = world
    rollout = services.start_canary(ctx, 4, FAST, actor="test")
    feed(ctx, 3000, {1: 0.7, 2: 0.7, 4: 0.7}, np.random.default_rng(1), {4: 0.3})
    phase = run_until_done(ctx, env, rollout.id, {1: 0.7, 2: 0.7, 4: 0.7}, {4: 0.3}, timeout_s=60)
    assert phase is Phase.ROLLED_BACK
    evaluations = [d for d in ctx.ledger.decisions(rollout.id) if d["actor"] == "scheduler"]
    # Newest first. Rows count once their 5 s aggregate bucket is whole, so the ticks before the first
    # whole bucket see no canary requests yet; the first that does rolls back, and none moved it before.
    assert evaluations[0]["action"] == "rollback", [d["action"] for d in evaluations]
    assert not {d["action"] for d in evaluations[1:]} & {"advance", "promote"}, [
        d["action"] for d in evaluations
    ]
    assert ctx.registry.version_for("canary") is None
    assert ctx.registry.get(4).stage == "Archived"
    doc = yaml.safe_load(Path(ctx.router.path).read_text())
    names = {e["name"] for e in doc["http"]["services"]["recsys-split"]["weighted"]["services"]}
    assert "recsys-v4" not in names
