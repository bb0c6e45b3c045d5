"""The operator's actions on a running rollout, one table for the CLI, the API and the web page.

No project imports: the CLI lists these names before it pays for the service layer (cli.py).
"""

from __future__ import annotations

from enum import StrEnum


class OperatorAction(StrEnum):
    """What an operator may do to a rollout (services.operate runs it)."""

    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"  # now, overriding the analysis
    ROLLBACK = "rollback"  # now, overriding the analysis

    @property
    def overrides(self) -> bool:
        """Promoting or rolling back now overrides the analysis: the operator must give a reason."""
        return self in _OVERRIDES

    @property
    def done(self) -> str:
        """The past tense, as a message to the operator says it."""
        return _DONE[self]


_OVERRIDES = frozenset({OperatorAction.PROMOTE, OperatorAction.ROLLBACK})
_DONE = {
    OperatorAction.PAUSE: "paused",
    OperatorAction.RESUME: "resumed",
    OperatorAction.PROMOTE: "promoted",
    OperatorAction.ROLLBACK: "rolled back",
}
ROUTE = f"<any({', '.join(OperatorAction)}):action>"  # a Flask URL part matching one of the actions
