"""A small replay of both policies: the sequential one keeps its false-promotion bound, the user's rule does not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from control_plane.analysis import simulate
from control_plane.analysis.policy import PROMOTE, ROLLBACK, Cause, Policy
from control_plane.analysis.simulate import Scenario, Traffic, run_scenario

SEQ, THR, TRAFFIC = Policy(), Policy(name="threshold"), Traffic()


def promoted(scenario: Scenario, policy: Policy, reps: int = 300) -> float:
    return float(np.mean(run_scenario(scenario, policy, TRAFFIC, reps, seed=42).action == PROMOTE))


@pytest.mark.parametrize(
    "scenario", [Scenario("A/A"), Scenario("at the margin", lift=0.01)], ids=lambda s: s.name
)
def test_sequential_policy_keeps_false_promotions_under_five_percent_while_looking_every_minute(scenario):
    assert promoted(scenario, SEQ) <= 0.05


def test_the_users_threshold_rule_promotes_an_identical_canary_far_more_often_under_continuous_peeking():
    assert promoted(Scenario("A/A"), THR) > 0.10


def test_sequential_policy_has_the_power_to_promote_a_two_point_gain():
    assert promoted(Scenario("+2 pts", lift=0.02), SEQ, reps=200) >= 0.8


def test_five_points_more_errors_are_rolled_back_within_two_evaluations():
    out = run_scenario(Scenario("errors", error_diff=0.05), SEQ, TRAFFIC, 1000, seed=1)
    assert np.mean((out.action == ROLLBACK) & (out.evals <= 2)) >= 0.95
    assert np.mean((out.action == ROLLBACK) & (out.evals <= 3)) >= 0.98


def test_the_looser_harm_alpha_is_what_catches_them_in_time():
    strict = replace(SEQ, harm_alpha=SEQ.alpha)
    out = run_scenario(Scenario("errors", error_diff=0.05), strict, TRAFFIC, 1000, seed=1)
    assert np.mean((out.action == ROLLBACK) & (out.evals <= 2)) < 0.95


def test_errors_exactly_at_the_margin_are_rolled_back_no_more_often_than_harm_alpha():
    scenario = Scenario("at the margin", error_diff=SEQ.error_margin)
    out = run_scenario(scenario, SEQ, TRAFFIC, 300, seed=5)
    assert np.mean((out.action == ROLLBACK) & (out.cause == Cause.ERRORS)) <= SEQ.harm_alpha


def test_main_writes_the_tables_and_the_power_curve(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulate, "SCENARIOS", (Scenario("A/A"), Scenario("accuracy +3 pts", lift=0.03)))
    assert simulate.main(["--reps", "20", "--out", str(tmp_path), "--seed", "3"]) == 0
    text = (tmp_path / "simulation.md").read_text()
    assert "### policy: sequential" in text and "### policy: threshold" in text and "| A/A |" in text
    assert (tmp_path / "power_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "false promotion" in capsys.readouterr().out
