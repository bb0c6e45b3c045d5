"""plan(rollout, decision, assignment) -> Plan: what one decision does to a rollout; no I/O.

The service layer records the plan (its traffic move stored as the rollout's pending action), applies the
move, then clears it; a crash in between is finished by applying the stored move again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

from control_plane.analysis.types import PROMOTED_WEIGHT, Action, Decision, Phase
from control_plane.rollout.assignment import EMPTY, Assignment, Slot
from control_plane.rollout.phases import transition


class MoveKind(StrEnum):
    """The traffic and registry change a decision asks for (the stored pending action's `kind`)."""

    WEIGHTS = "weights"  # the canary at a new step's weight
    PROMOTE = "promote"  # the candidate becomes the baseline; the old baseline is retired
    RETIRE_CANARY = "retire_canary"  # the candidate loses its weight and its alias, and is archived


@dataclass(frozen=True)
class TrafficMove:
    """The weights to put in force and what else changes; who holds which role follows from the kind."""

    kind: MoveKind
    weights: Mapping[str, int]

    def target(self, baseline: int | None, candidate: int, control: int | None) -> Assignment:
        """The assignment this move puts in force for a rollout of `candidate` over `baseline`."""
        w = self.weights
        control_slot = Slot(control, w["control"])
        if self.kind is MoveKind.WEIGHTS:
            return Assignment(Slot(baseline, w["baseline"]), Slot(candidate, w["canary"]), control_slot)
        if self.kind is MoveKind.PROMOTE:
            return Assignment(Slot(candidate, w["baseline"]), EMPTY, control_slot)
        return Assignment(Slot(baseline, w["baseline"]), EMPTY, control_slot)

    def to_dict(self, rollout_id: int) -> dict[str, Any]:
        """As stored in `rollouts.pending_action` (the format a crashed run left must stay readable)."""
        d: dict[str, Any] = {"kind": str(self.kind), "weights": dict(self.weights)}
        if self.kind is MoveKind.WEIGHTS:
            d["canary_weight"] = self.weights["canary"]
        return {**d, "rollout_id": rollout_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrafficMove:
        return cls(MoveKind(d["kind"]), {r: int(w) for r, w in d["weights"].items()})


@dataclass(frozen=True)
class RolloutChange:
    """The rollout columns one ledger write changes (Ledger.update); None leaves a column as it is."""

    phase: Phase | None = None
    canary_weight: int | None = None
    step_index: int | None = None
    step_started_at: float | None = None
    pending: TrafficMove | None = None  # stored as the rollout's pending action until it is applied
    ended_at: float | None = None
    reason: str | None = None


class RolloutPosition(Protocol):
    """What plan() reads of a rollout (ledger.Rollout has it)."""

    @property
    def phase(self) -> Phase: ...
    @property
    def step_index(self) -> int: ...
    @property
    def canary_weight(self) -> int: ...


@dataclass(frozen=True)
class Plan:
    """One decision's effect: the phase after, the traffic move (None: nothing moves), the step."""

    before: Phase
    after: Phase
    move: TrafficMove | None
    canary_weight: int  # as recorded: 100 after a promotion
    step_index: int
    new_step: bool  # the canary moved to a step's weight: the step's clock restarts once it is applied

    def columns(self, now: float, reason: str) -> RolloutChange:
        """The rollout's columns to write with the decision's ledger row."""
        change = RolloutChange(phase=self.after)
        if self.move is not None:
            change = replace(change, pending=self.move, canary_weight=self.canary_weight)
        if self.new_step:
            change = replace(change, step_index=self.step_index, step_started_at=now)
        if self.after.terminal:
            change = replace(change, ended_at=now, reason=reason)
        return change


_RETIRES = (Action.ROLLBACK, Action.HALT, Action.INCONCLUSIVE)


def plan(rollout: RolloutPosition, decision: Decision, assignment: Assignment) -> Plan:
    """What `decision` does to `rollout` under the traffic `assignment` in force; ForbiddenTransition
    when the rollout's phase does not allow the decision's action."""
    after = transition(rollout.phase, decision.action)
    move: TrafficMove | None = None
    if decision.action is Action.ADVANCE:
        move = TrafficMove(MoveKind.WEIGHTS, assignment.with_canary(decision.next_weight).weights)
    elif decision.action is Action.PROMOTE:
        move = TrafficMove(MoveKind.PROMOTE, assignment.promoted().weights)
    elif decision.action in _RETIRES:
        move = TrafficMove(MoveKind.RETIRE_CANARY, assignment.without_canary().weights)
    if move is None:
        weight = rollout.canary_weight
    else:
        weight = PROMOTED_WEIGHT if move.kind is MoveKind.PROMOTE else move.weights["canary"]
    advances = decision.action is Action.ADVANCE
    leaves_shadow = advances and rollout.phase is Phase.SHADOW  # the first step is step_index 0
    step = rollout.step_index + (1 if advances and not leaves_shadow else 0)
    return Plan(rollout.phase, after, move, weight, step, advances)
