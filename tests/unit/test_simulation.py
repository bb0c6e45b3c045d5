"""A small replay of both policies: the sequential one keeps its false-promotion bound, the user's rule does not."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from control_plane import simulate_cli
from control_plane.analysis import simulate
from control_plane.analysis.policy import HALT, PROMOTE, ROLLBACK, Cause, Policy
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


def within_two_evaluations(out) -> float:
    return float(np.mean((out.action == ROLLBACK) & (out.time_s <= 2 * TRAFFIC.eval_interval_s)))


@pytest.mark.parametrize("swing", [0.0, 0.5], ids=["steady", "traffic ±50 %"])
def test_five_points_more_errors_are_rolled_back_within_two_evaluations(swing):
    out = run_scenario(Scenario("errors", error_diff=0.05, rate_swing=swing), SEQ, TRAFFIC, 1000, seed=1)
    assert within_two_evaluations(out) >= 0.95
    assert np.mean(out.action == ROLLBACK) >= 0.99


def test_the_looser_harm_alpha_is_what_catches_them_in_time():
    strict = replace(SEQ, harm_alpha=SEQ.alpha)
    scenario = Scenario("errors", error_diff=0.05, rate_swing=0.5)
    out = run_scenario(scenario, strict, TRAFFIC, 1000, seed=1)
    assert within_two_evaluations(out) < 0.95


def test_a_trend_common_to_both_arms_during_the_ramp_does_not_promote_a_canary_below_the_margin():
    assert promoted(Scenario("drift", lift=0.008, drift_per_h=0.02), SEQ, reps=200) <= 0.05


def test_a_gain_that_decays_to_nothing_is_rarely_promoted():
    assert promoted(Scenario("novelty", lift=0.03, novelty_tau_s=2700.0), SEQ, reps=200) <= 0.10


def test_a_canary_losing_two_percent_of_its_requests_is_halted_before_any_verdict():
    out = run_scenario(Scenario("loss", srm_loss=0.02), SEQ, TRAFFIC, 200, seed=3)
    assert np.mean(out.action == HALT) >= 0.8 and np.mean(out.action == PROMOTE) == 0


def test_errors_exactly_at_the_margin_are_rolled_back_no_more_often_than_harm_alpha():
    scenario = Scenario("at the margin", error_diff=SEQ.error_margin)
    out = run_scenario(scenario, SEQ, TRAFFIC, 300, seed=5)
    assert np.mean((out.action == ROLLBACK) & (out.cause == Cause.ERRORS)) <= SEQ.harm_alpha


def test_main_writes_the_tables_and_the_power_curve(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        simulate,
        "SCENARIOS",
        (Scenario("A/A"), Scenario("accuracy +3 pts", lift=0.03), Scenario("errors +5 pts", error_diff=0.05)),
    )
    assert simulate_cli.main(["--reps", "20", "--out", str(tmp_path), "--seed", "3"]) == 0
    text = (tmp_path / "simulation.md").read_text()
    assert (
        "### policy: sequential" in text
        and "### policy: threshold" in text
        and "| A/A | not better |" in text
    )
    assert "## Targets" in text and "errors +5 pts: rolled back within two evaluations" in text
    assert "| +3.0 pts |" in text, "the power curve's points are tabulated"
    assert "### heavy-user A/A (sequential, 20 replications)" in text
    assert (
        "### heavy-user A/A (sequential, MRR, 20 replications)" in text
    )  # users as the unit on a ranking metric
    assert (tmp_path / "power_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "false promotion" in capsys.readouterr().out
