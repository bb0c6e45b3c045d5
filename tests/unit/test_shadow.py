"""The shadow phase: the Traefik file's mirroring service, the policy's fields, and the service layer's
shadow → rollback / shadow → first step, with the in-memory router, registry and deployer."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import yaml

from control_plane import queries, services
from control_plane.analysis.aggregates import SparseCounts
from control_plane.analysis.policy import Policy
from control_plane.analysis.shadow import score_drift
from control_plane.analysis.types import Phase
from control_plane.errors import InvalidRequest
from control_plane.traffic.base import Backend, InvalidBackends, Mirror
from control_plane.traffic.traefik_file import (
    GATEWAY_ROUTER,
    MIRROR_SERVICE,
    SPLIT_SERVICE,
    TraefikFileRouter,
    parse_mirror,
    render_dynamic_config,
)
from tests.traffic_rows import FAST_POLICY
from tests.unit.test_services import ctx  # noqa: F401  (the fixture)

SHADOW = {**FAST_POLICY, "shadow_percent": 20, "shadow_min_duration_s": 60}
BACKENDS = {"baseline": Backend(2, "http://127.0.0.1:3102"), "canary": Backend(3, "http://127.0.0.1:3103")}


def test_the_gateway_goes_through_a_mirroring_service_only_while_there_is_a_shadow():
    plain = render_dynamic_config(BACKENDS, {"baseline": 100, "canary": 0})
    assert plain["http"]["routers"][GATEWAY_ROUTER]["service"] == SPLIT_SERVICE
    assert MIRROR_SERVICE not in plain["http"]["services"] and parse_mirror(plain) is None

    config = render_dynamic_config(BACKENDS, {"baseline": 100, "canary": 0}, mirror=Mirror(3, 20))
    services = config["http"]["services"]
    assert config["http"]["routers"][GATEWAY_ROUTER]["service"] == MIRROR_SERVICE
    mirroring = services[MIRROR_SERVICE]["mirroring"]
    assert mirroring["service"] == SPLIT_SERVICE and mirroring["mirrorBody"] is True
    assert mirroring["mirrors"] == [{"name": "recsys-shadow-v3", "percent": 20}]
    (server,) = services["recsys-shadow-v3"]["loadBalancer"]["servers"]
    assert server == {"url": "http://127.0.0.1:3103/shadow", "preservePath": True}
    assert parse_mirror(config) == Mirror(3, 20)


def test_the_file_router_keeps_the_mirror_through_weight_changes_and_drops_it_with_its_version(tmp_path):
    router = TraefikFileRouter(tmp_path / "dynamic")
    router.apply(BACKENDS, {"baseline": 100, "canary": 0})
    with pytest.raises(InvalidBackends, match="version 7 holds no role"):
        router.set_mirror(Mirror(7, 20))
    router.set_mirror(Mirror(3, 20))
    router.set_weights({"baseline": 90, "canary": 10})
    assert router.get_mirror() == Mirror(3, 20)
    doc = yaml.safe_load(router.path.read_text())
    assert doc["http"]["routers"][GATEWAY_ROUTER]["service"] == MIRROR_SERVICE
    router.apply({"canary": None}, {"baseline": 100})
    assert router.get_mirror() is None
    assert MIRROR_SERVICE not in yaml.safe_load(router.path.read_text())["http"]["services"]


@pytest.mark.parametrize(
    ("field", "value"), [("shadow_percent", 101), ("shadow_percent", -1), ("shadow_percent", 2.5),
                         ("shadow_min_duration_s", -1)]
)  # fmt: skip
def test_bad_shadow_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Policy.from_dict({field: value})


def shadow_rows(
    context, version: int, route: str, n: int, *, error_rate: float, latency_ms: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    now = context.clock()
    rows = []
    for i in range(n):
        err = bool(rng.random() < error_rate)
        rows.append(
            {
                "request_id": uuid.uuid4().hex,
                "ts": now - 1 - i * 50 / n,
                "model_version": version,
                "role": "x",
                "route": route,
                "endpoint": "predict",
                "features": None,
                "score": None if err else float(rng.random()),
                "latency_ms": latency_ms * (1 + 0.2 * rng.random()),
                "status": 500 if err else 200,
            }
        )
    with context.engine.begin() as conn:
        queries.insert_predictions(conn, rows)


def shadow_minute(context, *, error_rate: float = 0.0, latency_ms: float = 5.0) -> None:
    """A minute: the baseline answers 1,000 live requests; 20 % of them are copied to the shadow (v3)."""
    context.clock.t += 60
    tick = int(context.clock.t)
    shadow_rows(context, 2, "weighted", 1000, error_rate=0.0, latency_ms=5.0, seed=tick)
    shadow_rows(context, 3, "shadow", 200, error_rate=error_rate, latency_ms=latency_ms, seed=tick + 1)


def test_a_shadow_rollout_starts_at_weight_0_with_its_share_mirrored(ctx):  # noqa: F811
    rollout = services.start_canary(ctx, 3, SHADOW, actor="test")
    assert rollout.phase is Phase.SHADOW and rollout.canary_weight == 0
    assert ctx.router.get_weights()["canary"] == 0
    assert ctx.router.get_backends()["canary"].version == 3
    assert ctx.router.get_mirror() == Mirror(3, 20)
    assert services.traffic(ctx)["shadow"] == {"version": 3, "percent": 20}
    with pytest.raises(Exception, match="shadow"):
        services.set_weights(ctx, {"baseline": 90, "control": 10}, actor="test")


@pytest.mark.parametrize(
    ("fault", "kwargs"), [("errors", {"error_rate": 0.1}), ("p99", {"latency_ms": 12.0})]
)
def test_a_candidate_that_errors_or_slows_down_is_stopped_in_the_shadow_phase(ctx, fault, kwargs):  # noqa: F811
    rollout = services.start_canary(ctx, 3, SHADOW, actor="test")
    shadow_minute(ctx, **kwargs)
    result = services.evaluate(ctx, tick=1)
    assert result["action"] == "rollback", result
    assert "stopped in the shadow phase" in result["reason"]
    after = ctx.ledger.get(rollout.id)
    assert after.phase is Phase.ROLLED_BACK and after.canary_weight == 0
    assert ctx.router.get_mirror() is None and ctx.router.get_weights()["canary"] == 0
    assert 3 not in ctx.deployer.endpoints()
    (last,) = ctx.ledger.decisions(rollout.id, limit=1)
    assert last["phase_before"] == "shadow" and last["stats"]["shadow"]["percent"] == 20
    assert {r["name"] for r in last["rules"]} >= {"shadow_error_harm", "shadow_latency_harm"}


def test_a_healthy_shadow_gets_the_first_step_once_its_minimum_time_has_passed(ctx):  # noqa: F811
    rollout = services.start_canary(ctx, 3, {**SHADOW, "shadow_min_duration_s": 100}, actor="test")
    shadow_minute(ctx)
    first = services.evaluate(ctx, tick=1)
    assert first["action"] == "hold" and "of the 100 s minimum" in first["reason"], first
    assert ctx.ledger.get(rollout.id).phase is Phase.SHADOW
    shadow_minute(ctx)
    second = services.evaluate(ctx, tick=2)
    assert second["action"] == "advance" and second["phase"] == "progressing", second
    after = ctx.ledger.get(rollout.id)
    assert after.step_index == 0 and after.canary_weight == 10
    assert ctx.router.get_weights() == {"baseline": 85, "canary": 10, "control": 5}
    assert ctx.router.get_mirror() is None
    scores = ctx.ledger.decisions(rollout.id, limit=1)[0]["stats"]["shadow"]["scores"]
    assert scores["shadow_n"] > 0 and scores["baseline_n"] > 0 and abs(scores["mean_diff"]) < 0.1, scores


def test_after_the_shadow_phase_the_steps_and_the_split_s_window_begin_at_the_first_weighted_step(ctx):  # noqa: F811
    rollout = services.start_canary(ctx, 3, {**SHADOW, "shadow_min_duration_s": 30}, actor="test")
    shadow_minute(ctx)
    assert services.evaluate(ctx, tick=1)["action"] == "advance"
    advanced = ctx.ledger.get(rollout.id)
    ctx.clock.t += 60
    shadow_rows(ctx, 2, "weighted", 900, error_rate=0.0, latency_ms=5.0, seed=7)
    shadow_rows(ctx, 3, "weighted", 100, error_rate=0.0, latency_ms=5.0, seed=8)
    services.evaluate(ctx, tick=2)
    stats = ctx.ledger.decisions(rollout.id, limit=1)[0]["stats"]
    # one step, the first weighted one (10 %): the shadow phase is not a step of the split
    assert [s["weights"]["canary"] for s in stats["steps"]] == [10]
    assert stats["steps"][0]["start"] >= advanced.step_started_at
    # the baseline's requests of the shadow phase are not in the split's window
    assert stats["window_start"] >= advanced.step_started_at


def test_the_shadow_phase_is_refused_where_the_mirror_cannot_mark_its_copies(ctx):  # noqa: F811
    ctx.settings = dataclasses.replace(ctx.settings, deployer="kubernetes")
    with pytest.raises(InvalidRequest, match="shadow_percent"):
        services.start_canary(ctx, 3, SHADOW, actor="test")
    assert ctx.ledger.active() is None and ctx.router.get_mirror() is None


def test_score_drift_is_the_mean_difference_and_the_largest_cdf_gap_of_the_bins():
    same = SparseCounts.of_bins(np.array([10, 20, 30, 40]))
    assert score_drift(same, same)["mean_diff"] == 0 and score_drift(same, same)["ks"] == 0
    higher = SparseCounts.of_bins(np.array([60, 70, 80, 90]))
    drift = score_drift(higher, same)
    assert drift["mean_diff"] == pytest.approx(0.5) and drift["ks"] == 1.0
    assert drift["shadow_n"] == drift["baseline_n"] == 4
    assert score_drift(SparseCounts(), same)["mean_diff"] is None
