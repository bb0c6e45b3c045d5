"""One row of the decision ledger, as a value: what moved, who moved it, why, and the evidence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane import observations
from control_plane.analysis.jsonable import jsonable
from control_plane.analysis.types import Decision, Observations, Phase


@dataclass(frozen=True)
class Entry:
    """A ledger row before it is written; `row(ts)` gives the table's columns."""

    rollout_id: int
    before: Phase
    after: Phase
    action: str  # the decision's action, or an operator's (start, pause, override_promote, recover ...)
    actor: str
    reason: str
    canary_weight: int
    tick: int | None = None  # the scheduled interval's start (epoch s); None: not a scheduled evaluation
    decision: Decision | None = None
    obs: Observations | None = None
    missed_ticks: int = 0

    def row(self, ts: float) -> dict[str, Any]:
        sizes, arms = self._arms()
        stats = dict(self.decision.stats) if self.decision is not None else {}
        if self.missed_ticks:
            stats["missed_ticks"] = self.missed_ticks
        return {
            "rollout_id": self.rollout_id,
            "ts": ts,
            "tick": self.tick,
            "phase_before": str(self.before),
            "phase_after": str(self.after),
            "action": self.action,
            "actor": self.actor,
            "reason": self.reason,
            "canary_weight": self.canary_weight,
            "sample_sizes": sizes,
            "metrics": arms,
            "rules": self._rules(),
            "stats": jsonable(stats),
        }

    def _arms(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Per role: the sample sizes, and the numbers a person reads (users beside requests)."""
        if self.obs is None:
            return {}, {}
        arms = {r: observations.summarize(a) for r, a in self.obs.arms.items()}
        sizes = {
            r: {"requests": a.requests, "labelled": a.labelled, "step_requests": a.step_requests}
            for r, a in self.obs.arms.items()
        }
        if self.obs.users is not None:
            for r, u in self.obs.users.arms.items():
                if r in sizes:
                    sizes[r].update(users=u.users, new_users=u.new_users)
                    arms[r]["users"] = u.users
        return sizes, arms

    def _rules(self) -> list[dict[str, Any]]:
        if self.decision is None:
            return []
        return [
            {
                "name": r.name,
                "value": r.value,
                "threshold": r.threshold,
                "passed": r.passed,
                "detail": r.detail,
            }
            for r in self.decision.rules
        ]
