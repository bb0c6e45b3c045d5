"""The rollout's transition table: every allowed move, and a forbidden one refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from control_plane.analysis.types import Action, Phase
from control_plane.rollout.phases import TRANSITIONS, ForbiddenTransition, Operator, allowed_from, transition

PE, S, P, PA = Phase.PENDING, Phase.SHADOW, Phase.PROGRESSING, Phase.PAUSED
ENDS = [
    (Action.PROMOTE, Phase.PROMOTED),
    (Action.ROLLBACK, Phase.ROLLED_BACK),
    (Action.HALT, Phase.HALTED),
    (Action.INCONCLUSIVE, Phase.INCONCLUSIVE),
]

ALLOWED = [
    (PE, Operator.START, P),
    (PE, Operator.START_SHADOW, S),
    (PE, Operator.START_FAILED, Phase.ROLLED_BACK),
    (PE, Action.PROMOTE, Phase.PROMOTED),  # an operator's override of a start that did not finish
    (PE, Action.ROLLBACK, Phase.ROLLED_BACK),
    (S, Action.HOLD, S),
    (S, Action.NO_DATA, S),
    (S, Action.ADVANCE, P),
    *[(S, a, after) for a, after in ENDS],
    (P, Action.HOLD, P),
    (P, Action.NO_DATA, P),
    (P, Action.ADVANCE, P),
    (P, Operator.PAUSE, PA),
    *[(P, a, after) for a, after in ENDS],
    (PA, Action.HOLD, PA),
    (PA, Action.NO_DATA, PA),
    (PA, Operator.RESUME, P),
    *[(PA, a, after) for a, after in ENDS],
]
MOVES = [*Action, *Operator]


@pytest.mark.parametrize("before, move, after", ALLOWED, ids=[f"{b} --{m}--> {a}" for b, m, a in ALLOWED])
def test_allowed_transition(before, move, after):
    assert transition(before, move) is after


def test_the_table_holds_exactly_the_allowed_transitions():
    table = {(b, m, a) for b, moves in TRANSITIONS.items() for m, a in moves.items()}
    assert table == set(ALLOWED)
    assert set(TRANSITIONS) == set(Phase)


FORBIDDEN = sorted(
    {(b, m) for b in Phase for m in MOVES} - {(b, m) for b, m, _ in ALLOWED}, key=lambda bm: (bm[0], bm[1])
)


@pytest.mark.parametrize("before, move", FORBIDDEN, ids=[f"{b} -/{m}/->" for b, m in FORBIDDEN])
def test_forbidden_transition_raises(before, move):
    with pytest.raises(ForbiddenTransition, match=f"a {before} rollout cannot {move}"):
        transition(before, move)


@pytest.mark.parametrize("phase", [p for p in Phase if p.terminal])
def test_an_ended_rollout_has_no_moves(phase):
    assert TRANSITIONS[phase] == {}


def test_an_operators_refusal_names_the_phases_that_allow_the_move():
    assert allowed_from(Operator.PAUSE) == (P,)
    assert allowed_from(Operator.RESUME) == (PA,)
    assert allowed_from(Action.ADVANCE) == (S, P)


def test_the_rollout_core_imports_nothing_above_it():
    """Imports point down: the core loads no service layer, web, database or SQL module."""
    code = (
        "import sys, control_plane.rollout.plan, control_plane.rollout.entry;"
        "above = ('control_plane.services', 'control_plane.web', 'control_plane.db', 'control_plane.ledger',"
        " 'sqlalchemy', 'flask');"
        "print(sorted(m for m in sys.modules if m.startswith(above)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
