"""plan(rollout, decision, assignment): table-driven cases named by what they show, as decide()'s are."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from control_plane.analysis.types import Action, Decision, Phase
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.rollout.phases import ForbiddenTransition
from control_plane.rollout.plan import MoveKind, Plan, RolloutChange, TrafficMove, plan

P, S, PA = Phase.PROGRESSING, Phase.SHADOW, Phase.PAUSED


@dataclass(frozen=True)
class Position:
    """A rollout as plan() reads it."""

    phase: Phase
    step_index: int = 1
    canary_weight: int = 25


# baseline 2 at 70, canary 3 at 25, control 1 at 5
WITH_CONTROL = Assignment(Slot(2, 70), Slot(3, 25), Slot(1, 5))
NO_CONTROL = Assignment(Slot(2, 75), Slot(3, 25))
SHADOWING = Assignment(Slot(2, 95), Slot(3, 0), Slot(1, 5))


def weights(baseline: int, canary: int, control: int) -> dict[str, int]:
    return {"baseline": baseline, "canary": canary, "control": control}


def move(kind: MoveKind, *w: int) -> TrafficMove:
    return TrafficMove(kind, weights(*w))


CASES = [
    # (name, rollout, action, next weight, assignment, expected plan)
    (
        "advances the canary to the next step, the control keeping its share",
        Position(P),
        Action.ADVANCE,
        50,
        WITH_CONTROL,
        Plan(P, P, move(MoveKind.WEIGHTS, 45, 50, 5), 50, 2, True),
    ),
    (
        "advances without a control: the baseline takes the rest",
        Position(P),
        Action.ADVANCE,
        50,
        NO_CONTROL,
        Plan(P, P, move(MoveKind.WEIGHTS, 50, 50, 0), 50, 2, True),
    ),
    (
        "leaves the shadow phase at the first step, step_index staying 0",
        Position(S, step_index=0, canary_weight=0),
        Action.ADVANCE,
        10,
        SHADOWING,
        Plan(S, P, move(MoveKind.WEIGHTS, 85, 10, 5), 10, 0, True),
    ),
    (
        "promotes: the candidate takes the baseline's share, recorded at 100",
        Position(P, step_index=3, canary_weight=50),
        Action.PROMOTE,
        100,
        WITH_CONTROL,
        Plan(P, Phase.PROMOTED, move(MoveKind.PROMOTE, 95, 0, 5), 100, 3, False),
    ),
    (
        "rolls back: the canary retired, the baseline takes its share back",
        Position(P),
        Action.ROLLBACK,
        0,
        WITH_CONTROL,
        Plan(P, Phase.ROLLED_BACK, move(MoveKind.RETIRE_CANARY, 95, 0, 5), 0, 1, False),
    ),
    (
        "halts on a sample-ratio mismatch: the canary retired",
        Position(P),
        Action.HALT,
        0,
        NO_CONTROL,
        Plan(P, Phase.HALTED, move(MoveKind.RETIRE_CANARY, 100, 0, 0), 0, 1, False),
    ),
    (
        "ends inconclusive at the time limit: the canary retired",
        Position(S, step_index=0, canary_weight=0),
        Action.INCONCLUSIVE,
        0,
        SHADOWING,
        Plan(S, Phase.INCONCLUSIVE, move(MoveKind.RETIRE_CANARY, 95, 0, 5), 0, 0, False),
    ),
    (
        "holds: nothing moves and the weight stays",
        Position(P),
        Action.HOLD,
        25,
        WITH_CONTROL,
        Plan(P, P, None, 25, 1, False),
    ),
    (
        "records a paused rollout's tick without moving it",
        Position(PA),
        Action.NO_DATA,
        25,
        WITH_CONTROL,
        Plan(PA, PA, None, 25, 1, False),
    ),
    (
        "an operator's rollback of a paused rollout retires the canary",
        Position(PA),
        Action.ROLLBACK,
        0,
        WITH_CONTROL,
        Plan(PA, Phase.ROLLED_BACK, move(MoveKind.RETIRE_CANARY, 95, 0, 5), 0, 1, False),
    ),
    (
        "a control without a version keeps no share",
        Position(P),
        Action.ADVANCE,
        50,
        Assignment(Slot(2, 75), Slot(3, 25), Slot(None, 0)),
        Plan(P, P, move(MoveKind.WEIGHTS, 50, 50, 0), 50, 2, True),
    ),
]


@pytest.mark.parametrize(
    "name, rollout, action, weight, assignment, expected", CASES, ids=[c[0] for c in CASES]
)
def test_plan(name, rollout, action, weight, assignment, expected):
    assert plan(rollout, Decision(action, "why", weight), assignment) == expected


@pytest.mark.parametrize(
    "phase, action",
    [(PA, Action.ADVANCE), (Phase.PENDING, Action.HOLD), (Phase.PROMOTED, Action.ROLLBACK)],
    ids=["a paused rollout never advances", "a pending one is not evaluated", "an ended one stays ended"],
)
def test_plan_refuses_what_the_phase_does_not_allow(phase, action):
    with pytest.raises(ForbiddenTransition, match=f"a {phase} rollout cannot {action}"):
        plan(Position(phase), Decision(action, "why", 0), WITH_CONTROL)


def test_columns_of_an_advance_store_the_move_and_restart_the_step():
    step = plan(Position(P), Decision(Action.ADVANCE, "why", 50), WITH_CONTROL)
    assert step.columns(now=100.0, reason="why") == RolloutChange(
        phase=P,
        pending=move(MoveKind.WEIGHTS, 45, 50, 5),
        canary_weight=50,
        step_index=2,
        step_started_at=100.0,
    )


def test_columns_of_an_ending_record_when_and_why():
    step = plan(Position(P), Decision(Action.ROLLBACK, "errors", 0), WITH_CONTROL)
    change = step.columns(now=100.0, reason="errors")
    assert (change.phase, change.ended_at, change.reason) == (Phase.ROLLED_BACK, 100.0, "errors")
    assert change.step_index is None and change.step_started_at is None


def test_columns_of_a_hold_change_only_the_phase():
    step = plan(Position(P), Decision(Action.HOLD, "wait", 25), WITH_CONTROL)
    assert step.columns(now=100.0, reason="wait") == RolloutChange(phase=P)


@pytest.mark.parametrize("kind", list(MoveKind))
def test_a_stored_move_reads_back_as_it_was(kind):
    m = move(kind, 70, 25 if kind is MoveKind.WEIGHTS else 0, 5)
    assert TrafficMove.from_dict(m.to_dict(rollout_id=3)) == m


@pytest.mark.parametrize(
    "kind, expected",
    [
        (MoveKind.WEIGHTS, Assignment(Slot(2, 45), Slot(3, 50), Slot(1, 5))),
        (MoveKind.PROMOTE, Assignment(Slot(3, 95), Slot(), Slot(1, 5))),
        (MoveKind.RETIRE_CANARY, Assignment(Slot(2, 95), Slot(), Slot(1, 5))),
    ],
    ids=["weights: candidate at the step", "promote: candidate as baseline", "retire: baseline only"],
)
def test_a_move_targets_the_rollouts_versions(kind, expected):
    w = weights(45, 50, 5) if kind is MoveKind.WEIGHTS else weights(95, 0, 5)
    assert TrafficMove(kind, w).target(baseline=2, candidate=3, control=1) == expected


def test_a_rollout_reads_its_pending_move_back():
    from control_plane.ledger import Rollout

    stored = move(MoveKind.PROMOTE, 95, 0, 5).to_dict(rollout_id=3)
    fields = dict.fromkeys(Rollout.__dataclass_fields__)
    rollout = Rollout(**{**fields, "pending_action": stored})
    assert rollout.pending == move(MoveKind.PROMOTE, 95, 0, 5)
    assert Rollout(**{**fields, "pending_action": None}).pending is None
