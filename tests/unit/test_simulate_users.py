"""The heavy-user A/A scenario: request-level analysis promotes falsely, user-level at most 5 %."""

from __future__ import annotations

from control_plane.analysis.policy import PROMOTE, Policy
from control_plane.analysis.simulate_users import HeavyUsers, heavy_user_table, run_heavy_users


def test_request_level_promotes_heavy_user_noise_and_user_level_does_not():
    out = run_heavy_users(Policy(), HeavyUsers(), reps=60, seed=3)
    assert out["request"].share(PROMOTE) >= 0.15, out["request"].action
    assert out["user"].share(PROMOTE) <= 0.05, out["user"].action


def test_with_light_users_only_both_units_agree_on_an_a_a():
    out = run_heavy_users(Policy(max_duration_s=3600.0), HeavyUsers(heavy_share=0.0, accuracy_sd=0.0), 40, 4)
    assert out["request"].share(PROMOTE) <= 0.1 and out["user"].share(PROMOTE) <= 0.1


def test_the_table_reports_both_units():
    text = heavy_user_table(Policy(max_duration_s=600.0), HeavyUsers(users=200), reps=5, seed=0)
    assert "| request |" in text and "| user |" in text


def test_on_a_ranking_metric_request_level_promotes_heavy_user_noise_and_user_level_does_not():
    # each request an exposure; users click at rates of their own, half at position 1 and half at 3
    out = run_heavy_users(Policy(metric="mrr", planning_accuracy=0.2), HeavyUsers(), reps=60, seed=3)
    assert out["request"].share(PROMOTE) >= 0.1, out["request"].action
    assert out["user"].share(PROMOTE) <= 0.05, out["user"].action


def test_the_ranking_table_names_its_metric():
    policy = Policy(metric="ctr_at_k", metric_k=3, max_duration_s=600.0)
    text = heavy_user_table(policy, HeavyUsers(users=200), reps=5, seed=0)
    assert "CTR@3" in text and "| user |" in text
    assert "CTR@" not in heavy_user_table(Policy(max_duration_s=600.0), HeavyUsers(users=200), 5, 0)
