"""The service layer end to end over in-memory fakes and SQLite: read → decide → apply → record."""

from __future__ import annotations

import dataclasses
import threading
import uuid

import numpy as np
import pytest
from sqlalchemy import func, insert, select

from control_plane import queries, services
from control_plane.action_lock import ActionLock
from control_plane.analysis.aggregates import BUCKET_S
from control_plane.analysis.types import Phase
from control_plane.context import Context
from control_plane.db.engine import make_engine, migrate
from control_plane.db.schema import decisions, labels
from control_plane.deployer.memory import InMemoryDeployer
from control_plane.errors import ActionBusy, DeployFailed, InvalidRequest, RolloutConflict
from control_plane.log_backlog import InMemoryLogBacklog
from control_plane.registry.memory import InMemoryRegistry
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.rollout.plan import MoveKind, RolloutChange, TrafficMove
from control_plane.settings import Settings
from control_plane.traffic.memory import InMemoryRouter
from control_plane.traffic_ops import apply_assignment
from tests.action_lock_support import held_by_another_thread
from tests.traffic_rows import FAST_POLICY, served_row

FAST = FAST_POLICY


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ctx(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    registry = InMemoryRegistry()
    for profile in ("control", "baseline", "better"):
        registry.add_version(profile=profile)
    registry.set_alias("control", 1)
    registry.set_alias("baseline", 2)
    c = Context(
        settings=Settings(state_dir=tmp_path, database_url=url, label_window_s=0),
        engine=make_engine(url),
        registry=registry,
        router=InMemoryRouter(),
        deployer=InMemoryDeployer(broken={9}),
        clock=Clock(),
        sleep=lambda s: None,
        log_backlog=InMemoryLogBacklog(),
    )
    c.deployer.deploy(1)
    c.deployer.deploy(2)
    apply_assignment(c, Assignment(baseline=Slot(2, 95), control=Slot(1, 5)))
    yield c
    c.engine.dispose()


def seed(
    ctx, version: int, n: int, *, accuracy: float, error_rate: float = 0.0, latency_ms: float = 5.0, rng=None
) -> None:
    """n weighted predictions for `version` in the past, each labelled, `accuracy` of them right."""
    rng = rng or np.random.default_rng(version)
    now = ctx.clock()
    preds, labs = [], []
    for i in range(n):
        rid = uuid.uuid4().hex
        err = rng.random() < error_rate
        score = float(rng.random())
        right = rng.random() < accuracy
        label = int(score >= 0.5) if right else int(score < 0.5)
        preds.append(served_row(rid, now - 1 - i * 50 / n, version, score, latency_ms + rng.random(), err))
        if not err:  # the label arrives with its prediction: within any attribution window
            labs.append({"request_id": rid, "label": label, "ts": preds[-1]["ts"]})
    with ctx.engine.begin() as conn:
        queries.insert_predictions(conn, preds)
        if labs:
            conn.execute(insert(labels), labs)


def seed_tick(
    ctx, total: int, accuracy: dict[int, float], error_rate: dict[int, float] | None = None
) -> None:
    """One minute of traffic split by the weights in force, as Traefik would split it."""
    ctx.clock.t += 60
    weights, backends = ctx.router.get_weights(), ctx.router.get_backends()
    for role, backend in backends.items():
        n = total * weights[role] // 100
        if n:
            seed(
                ctx,
                backend.version,
                n,
                accuracy=accuracy[backend.version],
                error_rate=(error_rate or {}).get(backend.version, 0.0),
                rng=np.random.default_rng(int(ctx.clock.t) + backend.version),
            )


def ledger_rows(ctx) -> int:
    with ctx.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(decisions)).scalar()


def test_starting_a_canary_deploys_it_at_the_first_steps_weight(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    assert rollout.phase is Phase.PROGRESSING
    assert ctx.router.get_weights() == {"baseline": 85, "canary": 10, "control": 5}
    assert ctx.router.get_backends()["canary"].version == 3
    assert ctx.registry.version_for("canary") == 3
    assert ledger_rows(ctx) == 1


def test_a_ledger_update_writes_only_the_columns_it_sets_and_the_move_as_stored(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    moved = TrafficMove(MoveKind.WEIGHTS, {"baseline": 70, "canary": 25, "control": 5})
    with ctx.engine.begin() as conn:
        ctx.ledger.update(conn, rollout.id, RolloutChange(pending=moved, canary_weight=25))
    after = ctx.ledger.get(rollout.id)
    assert after.pending_action == {
        "kind": "weights",
        "weights": {"baseline": 70, "canary": 25, "control": 5},
        "canary_weight": 25,
        "rollout_id": rollout.id,
    }
    assert after.pending == moved and after.canary_weight == 25
    assert (after.phase, after.step_index, after.step_started_at, after.ended_at, after.reason) == (
        rollout.phase,
        rollout.step_index,
        rollout.step_started_at,
        None,
        None,
    )


def test_a_canary_that_cannot_start_never_receives_weight(ctx):
    ctx.registry.add_version(profile="x")  # 4
    for _ in range(5):
        ctx.registry.add_version(profile="x")  # up to 9
    with pytest.raises(DeployFailed):
        services.start_canary(ctx, 9, FAST, actor="test")
    assert ctx.router.get_weights()["canary"] == 0
    assert ctx.ledger.active() is None
    assert ctx.ledger.list()[0].phase is Phase.ROLLED_BACK


def test_a_clearly_better_canary_advances_through_every_step_and_is_promoted(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seen = []
    for tick in range(1, 12):
        seed_tick(ctx, 3000, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
        result = services.evaluate(ctx, tick=tick)
        seen.append(result["action"])
        if ctx.ledger.get(rollout.id).phase.terminal:
            break
    assert seen[-1] == "promote", seen
    assert seen.count("advance") == 2, seen
    assert ctx.ledger.get(rollout.id).phase is Phase.PROMOTED
    assert ctx.registry.version_for("baseline") == 3
    assert ctx.registry.version_for("previous_baseline") == 2
    assert ctx.router.get_weights() == {"baseline": 95, "canary": 0, "control": 5}
    assert ctx.router.get_backends()["baseline"].version == 3
    assert 2 not in ctx.deployer.endpoints()  # the old baseline was drained and stopped
    last = ctx.ledger.decisions(rollout.id, limit=1)[0]
    assert last["metrics"]["canary"]["accuracy"] > last["metrics"]["baseline"]["accuracy"]
    assert last["rules"], "the ledger keeps each rule with its numbers"


def test_rolls_back_at_the_first_evaluation_when_the_canary_errors(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.75}, error_rate={3: 0.3})
    result = services.evaluate(ctx, tick=1)
    assert result["action"] == "rollback", result
    assert ctx.ledger.get(rollout.id).phase is Phase.ROLLED_BACK
    assert ctx.router.get_weights()["canary"] == 0
    assert ctx.registry.version_for("canary") is None
    assert ctx.registry.get(3).stage == "Archived"
    assert 3 not in ctx.deployer.endpoints()


def test_nothing_is_decided_while_a_bento_still_replays_rows_spilled_during_an_outage(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.75}, error_rate={3: 0.3})
    ctx.log_backlog.rows[2] = 1234  # the baseline's rows of the outage are not all back yet
    held = services.evaluate(ctx, tick=1)
    assert held["action"] == "no_data", held
    assert "still replaying" in held["reason"] and "version 2: 1,234 rows" in held["reason"]
    assert ctx.router.get_weights()["canary"] == 10 and ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING
    ctx.log_backlog.rows[2] = 0
    assert services.evaluate(ctx, tick=2)["action"] == "rollback"


def arriving_step(ctx, seconds: float, per_s: int, late: dict[int, float]) -> None:
    """`seconds` of the step's traffic split exactly by the weights; a version in `late` has its newest
    `late[version]` seconds not yet in the log (its writer writes on its own clock)."""
    weights, backends = ctx.router.get_weights(), ctx.router.get_backends()
    cycle = [r for r, w in weights.items() for _ in range(w)]  # 100 requests in the weights' proportions
    now, n = ctx.clock(), int(seconds * per_s)
    rows = []
    for i in range(n):
        version = backends[cycle[i % 100]].version
        ts = now - seconds + i / per_s
        if ts < now - late.get(version, 0.0):
            rows.append(served_row(uuid.uuid4().hex, ts, version, 0.7, 5.0, False))
    with ctx.engine.begin() as conn:
        queries.insert_predictions(conn, rows)


@pytest.mark.parametrize("settle_s, halted", [(2.0, False), (0.0, True)])
def test_a_step_is_judged_without_the_newest_rows_some_writers_have_not_written_yet(ctx, settle_s, halted):
    ctx.settings = dataclasses.replace(ctx.settings, log_settle_s=settle_s)
    # No attribution window closes within the step: only the sample-ratio check can act.
    rollout = services.start_canary(ctx, 3, {**FAST, "label_window_s": 3600}, actor="test")
    started = ctx.ledger.get(rollout.id).step_started_at
    ctx.clock.t = (started // BUCKET_S + 2) * BUCKET_S + 0.5
    # Half a second past the end of the step's first whole 5-second bucket: the baseline's writer has
    # just written; the canary's and the control's newest 1.2 s (partly in that bucket) are still on
    # their way, as with a Bento writing once a second.
    arriving_step(ctx, ctx.clock.t - started, 3000, late={3: 1.2, 1: 1.2})
    result = services.evaluate(ctx, tick=1)
    assert (result["action"] == "halt") is halted, result
    assert ("sample-ratio mismatch" in result["reason"]) is halted
    stats = ctx.ledger.decisions(rollout.id, limit=1)[0]["stats"]
    assert stats["window_end"] == pytest.approx(ctx.clock() - settle_s)


def test_a_backlog_of_a_version_without_a_role_does_not_hold_the_evaluation(ctx):
    services.start_canary(ctx, 3, FAST, actor="test")
    idle = ctx.registry.add_version(profile="x")  # deployed, serving no role
    ctx.deployer.deploy(idle)
    ctx.log_backlog.rows[idle] = 50
    assert services.evaluate(ctx, tick=1)["action"] != "no_data"


def test_running_the_same_tick_twice_records_one_evaluation(ctx):
    services.start_canary(ctx, 3, FAST, actor="test")
    before = ledger_rows(ctx)
    services.evaluate(ctx, tick=7)
    assert services.evaluate(ctx, tick=7) is None
    assert ledger_rows(ctx) == before + 1


def test_a_missed_tick_is_shown_in_the_ledger(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    services.evaluate(ctx, tick=60, interval_s=60)
    services.evaluate(ctx, tick=300, interval_s=60)
    last = ctx.ledger.decisions(rollout.id, limit=1)[0]
    assert last["stats"]["missed_ticks"] == 3
    assert "3 scheduled evaluations were missed" in last["reason"]


def test_a_crash_between_the_traffic_write_and_the_registry_move_is_completed_next_tick(ctx, monkeypatch):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")

    def crash(version):
        raise RuntimeError("worker killed here")

    monkeypatch.setattr(ctx.registry, "promote", crash)
    with pytest.raises(RuntimeError):
        services.promote_now(ctx, rollout.id, actor="test", reason="test")
    assert ctx.router.get_backends()["baseline"].version == 3  # traffic moved ...
    assert ctx.registry.version_for("baseline") == 2  # ... the registry did not
    assert ctx.ledger.get(rollout.id).pending_action is not None
    monkeypatch.undo()
    services.evaluate(ctx, tick=1)
    assert ctx.registry.version_for("baseline") == 3
    assert ctx.ledger.get(rollout.id).pending_action is None
    assert any(d["action"] == "recover" for d in ctx.ledger.decisions(rollout.id))


def test_the_fault_point_is_between_the_traffic_write_and_the_registry_move(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seen = []

    def fault_point(name: str) -> None:  # what tests/fault_worker.py kills a work horse with
        seen.append(
            (name, ctx.router.get_backends()["baseline"].version, ctx.registry.version_for("baseline"))
        )

    ctx.fault_point = fault_point
    services.promote_now(ctx, rollout.id, actor="test", reason="the fault point's place")
    assert seen == [("AFTER_TRAFFIC_WRITE", 3, 2)]  # traffic moved, the registry not yet


def test_a_fault_point_dies_once_and_only_where_it_is_armed(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    flag = tmp_path / "armed"
    code = (
        "import sys\nfrom pathlib import Path\nfrom tests.fault_worker import die_once_at\n"
        f"point = die_once_at('AFTER_TRAFFIC_WRITE', Path({str(flag)!r}))\n"
        "point('SOMEWHERE_ELSE')\npoint('AFTER_TRAFFIC_WRITE')\nprint('went on')\n"
    )
    root = Path(__file__).resolve().parents[2]
    flag.write_text("armed")
    died = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert died.returncode == 1 and "went on" not in died.stdout and not flag.exists()
    again = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert again.returncode == 0 and "went on" in again.stdout  # the flag is gone: the action goes through


def test_weights_cannot_be_changed_by_hand_while_a_rollout_progresses(ctx):
    services.start_canary(ctx, 3, FAST, actor="test")
    with pytest.raises(RolloutConflict):
        services.set_weights(ctx, {"baseline": 50, "canary": 50, "control": 0}, actor="test")


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"baseline": -1, "control": 5}, "baseline"),
        ({"baseline": "a lot"}, "baseline"),
        ({"nobody": 5, "baseline": 5}, "nobody"),
        ({"baseline": 0, "control": 0}, "positive"),
        ({"baseline": 50, "canary": 50}, "canary"),  # no canary deployed
    ],
)
def test_bad_weights_are_refused_with_a_message_and_change_nothing(ctx, weights, message):
    before = ctx.router.get_weights()
    with pytest.raises(InvalidRequest, match=message):
        services.set_weights(ctx, weights, actor="test")
    assert ctx.router.get_weights() == before


def test_restoring_the_previous_baseline_is_one_step(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    services.promote_now(ctx, rollout.id, actor="test", reason="test")
    assert ctx.registry.version_for("baseline") == 3
    services.restore_previous_baseline(ctx, actor="test")
    assert ctx.registry.version_for("baseline") == 2
    assert ctx.router.get_backends()["baseline"].version == 2
    assert ctx.registry.version_for("previous_baseline") == 3


def test_a_paused_rollout_records_ticks_but_does_not_act(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    services.pause(ctx, rollout.id, actor="test")
    seed(ctx, 3, 300, accuracy=0.75, error_rate=0.5)
    services.evaluate(ctx, tick=1)
    assert ctx.ledger.get(rollout.id).phase is Phase.PAUSED
    assert ctx.router.get_weights()["canary"] == 10
    services.resume(ctx, rollout.id, actor="test")
    assert ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING


def test_a_version_given_a_role_again_while_it_drains_is_neither_stopped_nor_archived(ctx):
    redeployed = []

    def another_action_during_the_drain(_seconds: float) -> None:
        if not redeployed:  # the operator puts v1, which is draining, back as the canary
            redeployed.append(services.deploy_role(ctx, 1, "canary", actor="operator"))

    ctx.sleep = another_action_during_the_drain
    services.deploy_role(ctx, 3, "control", actor="test")  # v1 loses the control role and drains
    assert redeployed
    assert ctx.router.get_backends()["canary"].version == 1
    assert 1 in ctx.deployer.endpoints()  # its Bento still serves
    assert ctx.registry.version_for("canary") == 1  # and its alias was not archived away


def test_a_version_that_lost_its_role_is_stopped_and_archived_after_the_drain(ctx):
    drained = []
    ctx.sleep = drained.append
    services.deploy_role(ctx, 3, "control", actor="test")
    assert drained == [ctx.drain_s]
    assert 1 not in ctx.deployer.endpoints()
    assert ctx.registry.get(1).stage == "Archived"


class GatedRouter(InMemoryRouter):
    """An InMemoryRouter whose next `apply` waits at a gate: an action caught half-way through."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()
        self.armed = False

    def apply(self, backends, weights) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.gate.wait(10), "the gate was never opened"
        super().apply(backends, weights)


def test_an_operators_rollback_waits_for_the_tick_in_progress_and_is_not_undone_by_it(ctx):
    router = GatedRouter()
    router.apply(ctx.router.get_backends(), ctx.router.get_weights())
    ctx.router = router
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seed_tick(ctx, 3000, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
    outcomes: dict[str, object] = {}

    def run(name, fn, *args, **kwargs):
        try:
            outcomes[name] = fn(*args, **kwargs)
        except Exception as exc:  # pragma: no cover - shown by the assertions below
            outcomes[name] = exc

    router.armed = True
    tick = threading.Thread(target=run, args=("tick", services.evaluate, ctx), kwargs={"tick": 1})
    tick.start()
    assert router.entered.wait(10), "the tick did not move traffic"
    operator = threading.Thread(
        target=run,
        args=("rollback", services.rollback_now, ctx, rollout.id),
        kwargs={"actor": "operator", "reason": "test"},
    )
    operator.start()
    operator.join(0.5)
    assert operator.is_alive(), "the rollback ran while the tick was still moving traffic"
    router.gate.set()
    tick.join(10)
    operator.join(10)

    assert outcomes["tick"]["action"] == "advance", outcomes
    assert ctx.ledger.get(rollout.id).phase is Phase.ROLLED_BACK, outcomes
    # The rollback came last, so it is what serves: no weight and no backend for the stopped canary.
    assert ctx.router.get_weights() == {"baseline": 95, "canary": 0, "control": 5}
    assert "canary" not in ctx.router.get_backends()
    assert 3 not in ctx.deployer.endpoints()
    actions = [d["action"] for d in reversed(ctx.ledger.decisions(rollout.id))]
    assert actions[-2:] == ["advance", "override_rollback"], actions


def test_an_action_that_cannot_wait_any_longer_is_refused_naming_the_one_in_progress(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    ctx.action_lock.wait_s = 0.2
    with held_by_another_thread(ActionLock(ctx.engine), "deploy_role by cli"):
        with pytest.raises(ActionBusy, match=r"another action is in progress \(deploy_role by cli, pid \d+"):
            services.pause(ctx, rollout.id, actor="operator")
        assert ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING  # nothing was done
    services.pause(ctx, rollout.id, actor="operator")  # free again
    assert ctx.ledger.get(rollout.id).phase is Phase.PAUSED


def test_the_harm_check_between_evaluations_rolls_back_an_erroring_canary_and_records_only_that(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    assert services.check_harm(ctx) is None, "no traffic yet: nothing to judge, nothing recorded"
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.75}, error_rate={3: 0.0})
    assert services.check_harm(ctx) is None
    assert [d["action"] for d in ctx.ledger.decisions(rollout.id)] == ["start"]
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.75}, error_rate={3: 0.3})
    result = services.check_harm(ctx)
    assert result["action"] == "rollback" and "harm check between evaluations" in result["reason"], result
    assert ctx.ledger.get(rollout.id).phase is Phase.ROLLED_BACK
    assert ctx.router.get_weights()["canary"] == 0
    row = ctx.ledger.decisions(rollout.id, limit=1)[0]
    assert row["actor"] == "harm-check" and row["tick"] is None and row["stats"]["harm_check"] is True


def test_an_evaluation_reads_each_ramp_step_and_records_its_own_difference(ctx):
    rollout = services.start_canary(ctx, 3, FAST, actor="test")
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.80})
    services.evaluate(ctx, tick=1)
    seed_tick(ctx, 3000, accuracy={1: 0.75, 2: 0.75, 3: 0.80})
    services.evaluate(ctx, tick=2)
    rows = ctx.ledger.decisions(rollout.id)
    assert [d["action"] for d in reversed(rows)] == ["start", "advance", "advance"]
    steps = rows[0]["stats"]["steps"]  # the second evaluation saw two steps: 10 % then 25 %
    assert [s["weights"]["canary"] for s in steps] == [10, 25]
    assert steps[0]["start"] == rollout.started_at and steps[1]["start"] == rows[1]["ts"]
    assert all(s["canary_labelled"] > 0 and s["baseline_labelled"] > 0 for s in steps)
    assert all(s["diff"] is None or -0.2 < s["diff"] < 0.3 for s in steps)
