"""The layout the userassign plugin uses, through its Python mirror, and the config the router renders."""

from __future__ import annotations

import collections

import pytest
import yaml

from control_plane.traffic import Backend, TraefikFileRouter
from control_plane.traffic.traefik_file import (
    GATEWAY_ROUTER,
    SPLIT_SERVICE,
    USER_ASSIGN_MIDDLEWARE,
    USERS_ROUTER,
    GatewayOptions,
    render_dynamic_config,
)
from control_plane.traffic.user_assignment import (
    BUCKETS,
    PLUGIN_ALIAS,
    STICKY_COOKIE,
    assigned_role,
    bucket,
    install_plugin,
    sticky_cookie_value,
    upper_bounds,
)

ALL = {
    "baseline": Backend(1, "http://127.0.0.1:3101"),
    "canary": Backend(2, "http://127.0.0.1:3102"),
    "control": Backend(0, "http://127.0.0.1:3100"),
}
USERS = [f"u{i}" for i in range(20_000)]


def test_the_hash_is_crc32_ieee_of_seed_and_id_as_go_s_crc32_update_continues_it():
    # CRC-32 (IEEE) check value of "123456789" is 0xCBF43926; a seed is continued, not mixed otherwise.
    assert bucket("123456789", seed="") == 0xCBF43926 % BUCKETS
    assert bucket("56789", seed="1234") == 0xCBF43926 % BUCKETS


@pytest.mark.parametrize("canary", [0, 1, 10, 25, 50, 90])
def test_shares_follow_the_weights(canary):
    weights = {"baseline": 95 - canary, "canary": canary, "control": 5}
    counts = collections.Counter(assigned_role(u, weights) for u in USERS)
    for role, weight in weights.items():
        assert abs(counts[role] / len(USERS) * 100 - weight) <= 1.0, counts


def test_every_step_of_a_ramp_moves_users_only_from_the_baseline_into_the_canary():
    steps = [10, 25, 50, 95]
    previous = {u: assigned_role(u, {"baseline": 90, "canary": 5, "control": 5}) for u in USERS}
    for canary in steps:
        now = {u: assigned_role(u, {"baseline": 95 - canary, "canary": canary, "control": 5}) for u in USERS}
        for u in USERS:
            if previous[u] != now[u]:
                assert (previous[u], now[u]) == ("baseline", "canary"), u
        previous = now


def test_rollback_sends_every_canary_user_to_the_baseline_and_leaves_the_control_alone():
    ramped = {u: assigned_role(u, {"baseline": 45, "canary": 50, "control": 5}) for u in USERS}
    rolled = {u: assigned_role(u, {"baseline": 95, "canary": 0, "control": 5}) for u in USERS}
    assert all(rolled[u] == "baseline" for u in USERS if ramped[u] == "canary")
    assert all(rolled[u] == ramped[u] for u in USERS if ramped[u] != "canary")


def test_bounds_skip_roles_without_weight_and_end_at_the_last_bucket():
    assert upper_bounds({"baseline": 100, "canary": 0, "control": 0}) == [("baseline", BUCKETS)]
    assert upper_bounds({"baseline": 0, "canary": 0, "control": 0}) == []
    assert assigned_role("anyone", {"baseline": 0}) is None


def test_the_router_renders_the_plugin_from_the_same_weights_as_the_split():
    config = render_dynamic_config(
        ALL, {"baseline": 70, "canary": 25, "control": 5}, GatewayOptions(user_assignment=True)
    )
    http = config["http"]
    arms = http["middlewares"][USER_ASSIGN_MIDDLEWARE]["plugin"][PLUGIN_ALIAS]["arms"]
    assert arms == [
        {"cookie": sticky_cookie_value("recsys-v0"), "weight": 5},
        {"cookie": sticky_cookie_value("recsys-v1"), "weight": 70},
        {"cookie": sticky_cookie_value("recsys-v2"), "weight": 25},
    ]
    assert http["services"][SPLIT_SERVICE]["weighted"]["sticky"]["cookie"]["name"] == STICKY_COOKIE
    assert USER_ASSIGN_MIDDLEWARE in http["routers"][USERS_ROUTER]["middlewares"]
    assert "X-User-Id" in http["routers"][USERS_ROUTER]["rule"]
    assert USER_ASSIGN_MIDDLEWARE not in http["routers"][GATEWAY_ROUTER]["middlewares"]
    plain = render_dynamic_config(ALL, {"baseline": 70, "canary": 25, "control": 5})["http"]
    assert USER_ASSIGN_MIDDLEWARE not in plain["middlewares"]
    assert "sticky" not in plain["services"][SPLIT_SERVICE]["weighted"]


def test_set_weights_rewrites_the_plugin_s_weights_in_the_same_file(tmp_path):
    router = TraefikFileRouter(tmp_path / "dynamic", options=GatewayOptions(user_assignment=True))
    router.apply(ALL, {"baseline": 85, "canary": 10, "control": 5})
    router.set_weights({"baseline": 95, "canary": 0, "control": 5})
    http = yaml.safe_load(router.path.read_text())["http"]
    weights = [
        a["weight"] for a in http["middlewares"][USER_ASSIGN_MIDDLEWARE]["plugin"][PLUGIN_ALIAS]["arms"]
    ]
    assert weights == [5, 95, 0]
    assert router.get_weights() == {"baseline": 95, "canary": 0, "control": 5}


def test_install_plugin_puts_the_source_where_traefik_looks(tmp_path):
    dest = install_plugin(tmp_path)
    assert dest == tmp_path / "plugins-local" / "src" / "recsys" / "userassign"
    assert {p.name for p in dest.iterdir()} >= {"userassign.go", "go.mod", ".traefik.yml"}
    install_plugin(tmp_path)  # again: replaced, not nested
    assert not (dest / "userassign").exists()


# --- the Kubernetes CRD router keeps the plugin's Middleware in step ---------------------------------


def test_the_crd_router_patches_the_plugin_middleware_before_the_split():
    from pathlib import Path

    from control_plane.traffic.traefik_crd import TraefikCrdRouter, child_name
    from tests.k8s_fake import FakeCluster

    cluster = FakeCluster()
    cluster.load(Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "gateway.yaml")
    cluster._store(
        "middlewares", {"kind": "Middleware", "metadata": {"name": USER_ASSIGN_MIDDLEWARE}, "spec": {}}
    )
    router = TraefikCrdRouter(cluster.clients(), "recsys", user_assignment=True)
    router.set_weights({"baseline": 70, "canary": 25, "control": 5})
    writes = [(c.resource, c.name) for c in cluster.writes()]
    assert writes[:2] == [("middlewares", USER_ASSIGN_MIDDLEWARE), ("traefikservices", "recsys-split")]
    arms = cluster.get("middlewares", USER_ASSIGN_MIDDLEWARE)["spec"]["plugin"][PLUGIN_ALIAS]["arms"]
    # the shipped seed: baseline v2, canary v3, control v1, children named as Traefik's CRD provider does
    assert child_name("recsys", 3) == "recsys-bento-v3-3000"
    assert arms == [
        {"cookie": sticky_cookie_value("recsys-bento-v1-3000"), "weight": 5},
        {"cookie": sticky_cookie_value("recsys-bento-v2-3000"), "weight": 70},
        {"cookie": sticky_cookie_value("recsys-bento-v3-3000"), "weight": 25},
    ]
    split = cluster.get("traefikservices", "recsys-split")["spec"]["weighted"]
    assert split["sticky"]["cookie"]["name"] == STICKY_COOKIE
    plain = FakeCluster()
    plain.load(Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "gateway.yaml")
    TraefikCrdRouter(plain.clients(), "recsys").set_weights({"baseline": 70, "canary": 25, "control": 5})
    assert [c.resource for c in plain.writes()] == ["traefikservices"]
    # off, the split drops the shipped sticky cookie: the Middleware's old weights steer nobody
    assert "sticky" not in plain.get("traefikservices", "recsys-split")["spec"]["weighted"]
