"""Rollouts and the decision ledger: every read and write of those two tables."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from control_plane.analysis.types import Action, Phase, RolloutState
from control_plane.bounds import row_int_in_range
from control_plane.db.schema import decisions, rollouts
from control_plane.errors import RolloutNotFound
from control_plane.rollout.plan import RolloutChange, TrafficMove

ACTIVE_PHASES = (Phase.PENDING, Phase.SHADOW, Phase.PROGRESSING, Phase.PAUSED)
# Ledger actions that are evaluations (the analysis or an operator deciding), not pause/resume/start.
EVALUATION_ACTIONS = tuple(str(a) for a in Action)


@dataclass(frozen=True)
class Rollout:
    """One rollout as stored."""

    id: int
    candidate_version: int
    baseline_version: int | None
    policy: str
    policy_params: dict[str, Any]
    phase: Phase
    step_index: int
    canary_weight: int
    started_at: float
    step_started_at: float
    updated_at: float
    ended_at: float | None
    reason: str | None
    pending_action: dict[str, Any] | None  # a recorded move not yet applied, as stored (the API shows it)

    @property
    def pending(self) -> TrafficMove | None:
        """The recorded move not yet applied (a run died before finishing it), if any."""
        return None if not self.pending_action else TrafficMove.from_dict(self.pending_action)

    def state(self, evaluations: int = 0, running_p_values: dict | None = None) -> RolloutState:
        return RolloutState(
            running_p_values=dict(running_p_values or {}),
            phase=self.phase,
            step_index=self.step_index,
            canary_weight=self.canary_weight,
            started_at=self.started_at,
            step_started_at=self.step_started_at,
            evaluations=evaluations,
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["phase"] = str(self.phase)
        return d


def _rollout(row) -> Rollout:
    m = dict(row._mapping)
    m["phase"] = Phase(m["phase"])
    return Rollout(**m)


class Ledger:
    """Persistence for rollouts and decisions over one SQLAlchemy engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # rollouts -------------------------------------------------------------
    def create_rollout(
        self,
        conn: Connection,
        *,
        candidate_version: int,
        baseline_version: int | None,
        policy: str,
        policy_params: dict,
        now: float,
    ) -> int:
        result = conn.execute(
            insert(rollouts).values(
                candidate_version=candidate_version,
                baseline_version=baseline_version,
                policy=policy,
                policy_params=policy_params,
                phase=str(Phase.PENDING),
                step_index=0,
                canary_weight=0,
                started_at=now,
                step_started_at=now,
                updated_at=now,
            )
        )
        return int(result.inserted_primary_key[0])

    def get(self, rollout_id: int, conn: Connection | None = None) -> Rollout:
        if not row_int_in_range(rollout_id):  # 2**63 would overflow SQLite's driver: no such row anyway
            raise RolloutNotFound(rollout_id)
        stmt = select(rollouts).where(rollouts.c.id == rollout_id)
        if conn is None:
            with self.engine.connect() as c:
                row = c.execute(stmt).first()
        else:
            row = conn.execute(stmt).first()
        if row is None:
            raise RolloutNotFound(rollout_id)
        return _rollout(row)

    def active(self, conn: Connection | None = None) -> Rollout | None:
        stmt = (
            select(rollouts)
            .where(rollouts.c.phase.in_([str(p) for p in ACTIVE_PHASES]))
            .order_by(rollouts.c.id.desc())
            .limit(1)
        )
        if conn is None:
            with self.engine.connect() as c:
                row = c.execute(stmt).first()
        else:
            row = conn.execute(stmt).first()
        return None if row is None else _rollout(row)

    def with_pending_action(self) -> list[Rollout]:
        with self.engine.connect() as c:
            rows = c.execute(select(rollouts).where(rollouts.c.pending_action.is_not(None))).all()
        return [_rollout(r) for r in rows if r.pending_action]

    def list(self, limit: int = 50) -> list[Rollout]:
        with self.engine.connect() as c:
            rows = c.execute(select(rollouts).order_by(rollouts.c.id.desc()).limit(limit)).all()
        return [_rollout(r) for r in rows]

    def update(self, conn: Connection, rollout_id: int, change: RolloutChange) -> None:
        """Write the columns `change` sets (and `updated_at`); the others keep their values."""
        values: dict[str, Any] = {
            "phase": None if change.phase is None else str(change.phase),
            "canary_weight": change.canary_weight,
            "step_index": change.step_index,
            "step_started_at": change.step_started_at,
            "pending_action": None if change.pending is None else change.pending.to_dict(rollout_id),
            "ended_at": change.ended_at,
            "reason": change.reason,
        }
        values = {k: v for k, v in values.items() if v is not None}
        values["updated_at"] = time.time()
        conn.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(**values))

    def clear_pending(self, rollout_id: int, step_started_at: float | None = None) -> None:
        """The recorded action is applied; a new step starts counting once its weights are in force."""
        values: dict[str, Any] = {"pending_action": None}
        if step_started_at is not None:
            values["step_started_at"] = step_started_at
        with self.engine.begin() as c:
            c.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(**values))

    # decisions ------------------------------------------------------------
    def record(self, conn: Connection, **row) -> int:
        """Insert one ledger row; raises IntegrityError if this rollout already has a row for the tick."""
        result = conn.execute(insert(decisions).values(**row))
        return int(result.inserted_primary_key[0])

    def decisions(self, rollout_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(decisions).order_by(decisions.c.id.desc()).limit(limit)
        if rollout_id is not None:
            stmt = stmt.where(decisions.c.rollout_id == rollout_id)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(stmt).all()]

    def action_counts(self) -> dict[str, int]:
        """Ledger rows per action (every action ever recorded, operators' included)."""
        with self.engine.connect() as c:
            rows = c.execute(select(decisions.c.action, func.count()).group_by(decisions.c.action)).all()
        return {str(action): int(n) for action, n in rows}

    def last_evaluation(self) -> dict[str, Any] | None:
        """`ts`, `stats` and `rules` of the newest row that is an evaluation (an Action: the analysis or
        an operator deciding, not a start, pause or resume); None before the first."""
        with self.engine.connect() as c:
            row = c.execute(
                select(decisions.c.ts, decisions.c.stats, decisions.c.rules)
                .where(decisions.c.action.in_(EVALUATION_ACTIONS))
                .order_by(decisions.c.id.desc())
                .limit(1)
            ).first()
        return None if row is None else dict(row._mapping)

    def last_stat(self, conn: Connection, rollout_id: int, key: str) -> Any:
        """`stats[key]` of the rollout's newest scheduled evaluation (running statistics carry over)."""
        row = conn.execute(
            select(decisions.c.stats)
            .where(decisions.c.rollout_id == rollout_id, decisions.c.tick.is_not(None))
            .order_by(decisions.c.id.desc())
            .limit(1)
        ).first()
        return None if row is None else (row[0] or {}).get(key)

    def step_history(self, conn: Connection, rollout_id: int) -> list[tuple[float, int]]:
        """(when, canary weight) of the rollout's start and each advance, oldest first: its ramp steps."""
        rows = conn.execute(
            select(decisions.c.ts, decisions.c.canary_weight)
            .where(decisions.c.rollout_id == rollout_id, decisions.c.action.in_(("start", "advance")))
            .order_by(decisions.c.id)
        ).all()
        return [(float(ts), int(w)) for ts, w in rows]

    def decision_times(self, conn: Connection, rollout_id: int) -> list[float]:
        """When each of the rollout's decisions was recorded, oldest first."""
        q = select(decisions.c.ts).where(decisions.c.rollout_id == rollout_id).order_by(decisions.c.id)
        return [float(ts) for ts in conn.execute(q).scalars()]

    def evaluations(self, conn: Connection, rollout_id: int) -> tuple[int, int | None]:
        """How many scheduled evaluations the rollout has had, and the newest tick."""
        from sqlalchemy import func

        row = conn.execute(
            select(func.count(decisions.c.tick), func.max(decisions.c.tick)).where(
                decisions.c.rollout_id == rollout_id
            )
        ).one()
        return int(row[0]), (None if row[1] is None else int(row[1]))


__all__ = ["ACTIVE_PHASES", "IntegrityError", "Ledger", "Rollout"]
