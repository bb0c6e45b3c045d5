"""The rollout's phases as one transition table: which move takes which phase where.

A move is a decision's action (a scheduled evaluation, the harm check, an operator's override) or an
operator's own move (start, pause, resume). Terminal phases have no moves.
"""

from __future__ import annotations

from enum import StrEnum

from control_plane.analysis.types import Action, Phase


class Operator(StrEnum):
    """The moves that are not decisions."""

    START = "start"  # the canary deployed at the first step's weight
    START_SHADOW = "start_shadow"  # the candidate deployed at weight 0, a share of requests mirrored to it
    START_FAILED = "start_failed"  # the candidate's deploy failed: it never got weight
    PAUSE = "pause"
    RESUME = "resume"


Move = Action | Operator


class ForbiddenTransition(ValueError):
    """A move the rollout's phase does not allow; the message names both."""

    def __init__(self, phase: Phase, move: Move):
        super().__init__(f"a {phase} rollout cannot {move}")
        self.phase = phase
        self.move = move


def _ends() -> dict[Move, Phase]:
    """The decisions that end a rollout."""
    return {
        Action.PROMOTE: Phase.PROMOTED,
        Action.ROLLBACK: Phase.ROLLED_BACK,
        Action.HALT: Phase.HALTED,
        Action.INCONCLUSIVE: Phase.INCONCLUSIVE,
    }


def _stays(phase: Phase) -> dict[Move, Phase]:
    """An evaluation that decides nothing: the rollout stays where it is."""
    return {Action.HOLD: phase, Action.NO_DATA: phase}


TRANSITIONS: dict[Phase, dict[Move, Phase]] = {
    # only an operator's override acts on a rollout whose start did not finish
    Phase.PENDING: {
        Operator.START: Phase.PROGRESSING,
        Operator.START_SHADOW: Phase.SHADOW,
        Operator.START_FAILED: Phase.ROLLED_BACK,
        Action.PROMOTE: Phase.PROMOTED,
        Action.ROLLBACK: Phase.ROLLED_BACK,
    },
    # the shadow phase passed: the first step's weight, step_index 0
    Phase.SHADOW: {**_stays(Phase.SHADOW), Action.ADVANCE: Phase.PROGRESSING, **_ends()},
    Phase.PROGRESSING: {
        **_stays(Phase.PROGRESSING),
        Action.ADVANCE: Phase.PROGRESSING,
        Operator.PAUSE: Phase.PAUSED,
        **_ends(),
    },
    # ticks are recorded but nothing moves; an operator may still resume or override
    Phase.PAUSED: {**_stays(Phase.PAUSED), Operator.RESUME: Phase.PROGRESSING, **_ends()},
    Phase.PROMOTED: {},
    Phase.ROLLED_BACK: {},
    Phase.HALTED: {},
    Phase.INCONCLUSIVE: {},
}


def transition(phase: Phase, move: Move) -> Phase:
    """The phase `move` takes a rollout in `phase` to; ForbiddenTransition if the table has no such move."""
    after = TRANSITIONS[phase].get(move)
    if after is None:
        raise ForbiddenTransition(phase, move)
    return after


def allowed_from(move: Move) -> tuple[Phase, ...]:
    """The phases in which `move` is allowed (an operator's refusal names them)."""
    return tuple(p for p, moves in TRANSITIONS.items() if move in moves)
