"""The soak of `make soak` (load/soak.py), for 40 s: the same bounds while a canary advances.

Locust through the gateway at a steady ~60 requests/s (predictions, recommendations, labels), the
canary started through the API after a warm-up and moved a step every 15 s. Runs before test_story.py
(which starts from whatever rollout state it finds): the canary is rolled back at the end.
"""

from __future__ import annotations

import pytest

from load import soak

pytestmark = pytest.mark.e2e

DURATION_S = 40


def test_a_short_soak_holds_the_error_memory_and_logging_bounds_while_a_canary_advances(stack, tmp_path):
    settings = stack.settings()
    bounds = soak.Bounds()
    result = soak.soak(
        settings,
        duration_s=DURATION_S,
        users=16,
        think_s=0.5,
        warmup_s=8,
        settle_s=3,
        sample_every_s=5,
        policy=soak.SHORT_POLICY,
        workdir=tmp_path,
        bounds=bounds,
    )
    table = soak.render(result, bounds)
    print("\n" + table)
    try:
        assert result.requests >= DURATION_S * 30, table
        assert result.canary and any(line.startswith("advance") for line in result.canary), table
        assert not result.broken, table
    finally:
        _, rollouts = soak.api(settings, "GET", "/api/rollouts?limit=1")
        if rollouts["active"]:
            soak.api(
                settings,
                "POST",
                f"/api/rollouts/{rollouts['active']}/rollback",
                {"reason": "the soak test ends its rollout"},
            )
