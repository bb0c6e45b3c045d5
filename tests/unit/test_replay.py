"""The simulation's production path: rows through the aggregate functions, the worker's builder, decide()."""

from __future__ import annotations

from control_plane.analysis.policy import Policy
from control_plane.analysis.simulate import SCENARIOS, Traffic
from control_plane.replay import replay


def test_a_canary_with_five_points_more_errors_is_rolled_back_through_the_aggregates():
    harmful = next(s for s in SCENARIOS if s.name == "errors +5 pts")
    out = replay(harmful, Policy(name="sequential"), Traffic(), seed=3)
    assert out.action == "rollback"
    assert out.minutes <= 10
