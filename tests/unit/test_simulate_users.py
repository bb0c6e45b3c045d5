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
