"""The traffic seam: weight validation, the in-memory router, the rendered Traefik config, the store."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path

import pytest
import yaml

from control_plane.db.engine import make_engine, migrate
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.traffic import (
    Backend,
    InMemoryRouter,
    InvalidBackends,
    InvalidWeights,
    TraefikFileRouter,
    TrafficStateUnreadable,
    TrafficStore,
    render_static_config,
    validate_weights,
)
from control_plane.traffic.static import render_admin_config
from control_plane.traffic.traefik_file import DYNAMIC_FILENAME, render_dynamic_config

V1 = Backend(1, "http://127.0.0.1:3101")
V2 = Backend(2, "http://127.0.0.1:3102")
V0 = Backend(0, "http://127.0.0.1:3100")
ALL = {"baseline": V1, "canary": V2, "control": V0}
SPLIT = {"baseline": 85, "canary": 10, "control": 5}
REPO = Path(__file__).resolve().parents[2]


# --- validate_weights -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"baseline": -1, "canary": 10}, "weight for 'baseline' must not be negative, got -1"),
        ({"baseline": 85.0}, "weight for 'baseline' must be an integer, got float 85.0"),
        ({"baseline": "85"}, "weight for 'baseline' must be an integer, got str '85'"),
        ({"baseline": True}, "weight for 'baseline' must be an integer, got bool True"),
        ({"baseline": None}, "weight for 'baseline' must be an integer, got NoneType None"),
        ({"shadow": 5, "baseline": 95}, "unknown role(s) 'shadow'; roles are baseline, canary, control"),
        ({"baseline": 0, "canary": 0, "control": 0}, "at least one role must have a positive weight"),
        ({}, "at least one role must have a positive weight"),
        ([("baseline", 100)], "weights must be a mapping"),
    ],
    ids=["negative", "float", "string", "bool", "none", "unknown role", "all zero", "empty", "not a mapping"],
)
def test_validate_weights_rejects_each_bad_case_with_a_message_naming_it(weights, message):
    with pytest.raises(InvalidWeights) as err:
        validate_weights(weights)
    assert message in str(err.value)


def test_validate_weights_fills_missing_roles_with_zero():
    assert validate_weights({"baseline": 100}) == {"baseline": 100, "canary": 0, "control": 0}
    assert validate_weights(SPLIT) == SPLIT


def test_invalid_weights_is_a_value_error():
    assert issubclass(InvalidWeights, ValueError)


# --- InMemoryRouter ---------------------------------------------------------------------------


def test_in_memory_router_starts_empty_and_keeps_what_it_is_given():
    router = InMemoryRouter()
    assert router.get_weights() == {"baseline": 0, "canary": 0, "control": 0}
    assert router.get_backends() == {}
    router.set_backends(ALL)
    router.set_weights(SPLIT)
    assert router.get_backends() == ALL
    assert router.get_weights() == SPLIT
    assert len(router.writes) == 2


def test_in_memory_router_refuses_weight_for_a_role_without_backend():
    router = InMemoryRouter(backends={"baseline": V1})
    with pytest.raises(InvalidWeights, match="role 'canary' has weight 10 but no backend"):
        router.set_weights({"baseline": 90, "canary": 10})
    assert router.get_weights() == {"baseline": 0, "canary": 0, "control": 0}


def test_removing_a_backend_that_still_has_weight_is_refused():
    router = InMemoryRouter(backends=ALL, weights=SPLIT)
    with pytest.raises(InvalidWeights, match="role 'canary' has weight 10"):
        router.set_backends({"canary": None})
    router.set_weights({"baseline": 95, "canary": 0, "control": 5})
    router.set_backends({"canary": None})
    assert set(router.get_backends()) == {"baseline", "control"}


def test_one_version_cannot_hold_two_roles():
    router = InMemoryRouter(backends=ALL)
    with pytest.raises(InvalidBackends, match="version 1 cannot hold both 'baseline' and 'canary'"):
        router.set_backends({"canary": Backend(1, "http://127.0.0.1:3101")})


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"shadow": V1}, "unknown role(s) 'shadow'"),
        ({"canary": "http://x"}, "must be a Backend or None"),
        ({"canary": Backend(-1, "http://x")}, "non-negative integer"),
        ({"canary": Backend(3, "127.0.0.1:3103")}, "must start with http://"),
    ],
)
def test_bad_backends_are_refused_with_a_message(update, message):
    with pytest.raises(InvalidBackends) as err:
        InMemoryRouter().set_backends(update)
    assert message in str(err.value)


def test_apply_swaps_backends_and_weights_in_one_write():
    router = InMemoryRouter(backends=ALL, weights=SPLIT)
    router.apply({"baseline": V2, "canary": None}, {"baseline": 95, "control": 5})
    assert router.get_backends() == {"baseline": V2, "control": V0}
    assert router.get_weights() == {"baseline": 95, "canary": 0, "control": 5}


# --- the rendered dynamic config --------------------------------------------------------------


def _render(**kwargs):
    from control_plane.traffic.traefik_file import GatewayOptions

    return render_dynamic_config(ALL, SPLIT, GatewayOptions(**kwargs))["http"]


def test_weighted_service_splits_by_role_weight_over_one_service_per_version():
    http = _render()
    assert http["services"]["recsys-split"]["weighted"] == {
        "services": [
            {"name": "recsys-v1", "weight": 85},
            {"name": "recsys-v2", "weight": 10},
            {"name": "recsys-v0", "weight": 5},
        ],
        "healthCheck": {},
    }
    assert http["services"]["recsys-v2"]["loadBalancer"] == {
        "servers": [{"url": "http://127.0.0.1:3102"}],
        "passHostHeader": True,
        "healthCheck": {"path": "/readyz", "interval": "2s", "timeout": "2s"},
    }


def test_gateway_router_marks_weighted_traffic_limits_bodies_and_retries():
    http = _render(max_body_bytes=5000)
    gateway = http["routers"]["gateway"]
    assert gateway["rule"] == "Path(`/predict`) || Path(`/recommend`)"
    assert gateway["entryPoints"] == ["web"]
    assert gateway["service"] == "recsys-split"
    assert gateway["middlewares"] == ["recsys-route-weighted", "recsys-body-limit", "recsys-retry"]
    mw = http["middlewares"]
    assert mw["recsys-route-weighted"] == {
        "headers": {"customRequestHeaders": {"X-Recsys-Route": "weighted"}}
    }
    assert mw["recsys-route-override"] == {
        "headers": {"customRequestHeaders": {"X-Recsys-Route": "override"}}
    }
    assert mw["recsys-body-limit"] == {"buffering": {"maxRequestBodyBytes": 5000}}
    assert 2 <= mw["recsys-retry"]["retry"]["attempts"] <= 3


def test_header_overrides_outrank_the_split_and_go_straight_to_a_version():
    routers = _render()["routers"]
    by_version = routers["override-version-2"]
    assert by_version["rule"] == "(Path(`/predict`) || Path(`/recommend`)) && Header(`X-Model-Version`, `2`)"
    assert by_version["service"] == "recsys-v2"
    by_role = routers["override-role-control"]
    assert by_role["rule"] == "(Path(`/predict`) || Path(`/recommend`)) && Header(`X-Model-Role`, `control`)"
    assert by_role["service"] == "recsys-v0"
    for name in ("override-version-2", "override-role-control"):
        assert routers[name]["middlewares"][0] == "recsys-route-override"
        assert "recsys-retry" not in routers[name]["middlewares"]
    assert by_version["priority"] > by_role["priority"] > routers["gateway"]["priority"]


def test_feedback_goes_to_the_control_plane_only_when_it_is_configured():
    assert "feedback" not in _render()["routers"]
    http = _render(control_plane_url="http://127.0.0.1:8090")
    assert http["routers"]["feedback"]["rule"] == "PathPrefix(`/feedback`)"
    assert http["routers"]["feedback"]["service"] == "control-plane"
    assert (
        http["routers"]["feedback"]["middlewares"][-1] == "recsys-retry"
    )  # the same label again is harmless
    assert http["services"]["control-plane"]["loadBalancer"]["servers"] == [{"url": "http://127.0.0.1:8090"}]


def test_extra_versions_are_reachable_by_header_but_get_no_weighted_traffic():
    http = _render(extra_versions={7: "http://127.0.0.1:3107"})
    assert http["routers"]["override-version-7"]["service"] == "recsys-v7"
    assert "recsys-v7" in http["services"]
    assert "recsys-v7" not in [s["name"] for s in http["services"]["recsys-split"]["weighted"]["services"]]


def test_nothing_is_routed_before_any_role_has_a_backend():
    http = render_dynamic_config({}, {}, None)["http"]
    assert list(http["routers"]) == ["length-required"] and http["services"] == {}


def test_a_body_without_a_content_length_is_refused_before_any_backend_router():
    http = _render()
    refusal = http["routers"]["length-required"]
    assert refusal["priority"] > max(
        r.get("priority", 0) for n, r in http["routers"].items() if n != "length-required"
    )
    assert "!HeaderRegexp(`Content-Length`" in refusal["rule"] and "Method(`POST`)" in refusal["rule"]
    (middleware,) = refusal["middlewares"]
    assert http["middlewares"][middleware]["ipAllowList"]["rejectStatusCode"] == 411


# --- TraefikFileRouter: the file is the state -------------------------------------------------


def test_file_router_reads_its_state_back_from_the_file(tmp_path):
    dynamic = tmp_path / "traefik" / "dynamic"
    router = TraefikFileRouter(dynamic)
    router.set_backends(ALL)
    router.set_weights(SPLIT)
    restarted = TraefikFileRouter(dynamic)
    assert restarted.get_backends() == ALL
    assert restarted.get_weights() == SPLIT
    assert yaml.safe_load((dynamic / DYNAMIC_FILENAME).read_text())["http"]["routers"]["gateway"]


def test_file_router_enforces_the_same_rules_as_the_in_memory_one(tmp_path):
    router = TraefikFileRouter(tmp_path / "dynamic")
    router.set_backends({"baseline": V1})
    with pytest.raises(InvalidWeights, match="role 'canary' has weight 10 but no backend"):
        router.set_weights({"baseline": 90, "canary": 10})
    with pytest.raises(InvalidWeights, match="must be an integer"):
        router.set_weights({"baseline": 1.5})
    assert router.get_weights() == {"baseline": 0, "canary": 0, "control": 0}


def test_atomic_write_leaves_nothing_but_the_config_in_the_watched_dir(tmp_path):
    dynamic = tmp_path / "traefik" / "dynamic"
    router = TraefikFileRouter(dynamic)
    router.set_backends(ALL)
    for canary in range(1, 15):
        router.set_weights({"baseline": 100 - canary, "canary": canary})
    assert os.listdir(dynamic) == [DYNAMIC_FILENAME]
    # Temp files live beside the watched dir and are renamed away; only the lock file stays.
    assert os.listdir(tmp_path / "traefik" / ".tmp") == [f"{DYNAMIC_FILENAME}.lock"]
    assert oct((dynamic / DYNAMIC_FILENAME).stat().st_mode & 0o777) == "0o644"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    dynamic = tmp_path / "dynamic"
    router = TraefikFileRouter(dynamic)
    router.set_backends(ALL)
    router.set_weights(SPLIT)
    before = (dynamic / DYNAMIC_FILENAME).read_text()

    def boom(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("control_plane.traffic.traefik_file.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        router.set_weights({"baseline": 50, "canary": 50})
    assert (dynamic / DYNAMIC_FILENAME).read_text() == before
    assert [p.name for p in (tmp_path / ".tmp").iterdir()] == [f"{DYNAMIC_FILENAME}.lock"]


def test_unchanged_weights_do_not_rewrite_the_file(tmp_path):
    router = TraefikFileRouter(tmp_path / "dynamic")
    router.set_backends(ALL)
    router.set_weights(SPLIT)
    inode = router.path.stat().st_ino
    router.set_weights(dict(SPLIT))
    assert router.path.stat().st_ino == inode


def test_concurrent_writers_do_not_lose_each_others_changes(tmp_path):
    dynamic = tmp_path / "dynamic"
    TraefikFileRouter(dynamic).set_backends({"baseline": V1})
    TraefikFileRouter(dynamic).set_weights({"baseline": 100})

    def add(role, backend):
        TraefikFileRouter(dynamic).set_backends({role: backend})

    threads = [threading.Thread(target=add, args=a) for a in (("canary", V2), ("control", V0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert TraefikFileRouter(dynamic).get_backends() == ALL


def test_a_garbled_file_is_reported_not_taken_as_empty(tmp_path):
    dynamic = tmp_path / "dynamic"
    dynamic.mkdir()
    (dynamic / DYNAMIC_FILENAME).write_text("http: [unclosed")
    with pytest.raises(TrafficStateUnreadable, match="cannot read routing state"):
        TraefikFileRouter(dynamic).get_weights()


# --- static config ----------------------------------------------------------------------------


def test_static_config_binds_loopback_and_keeps_the_api_off_the_gateway(tmp_path):
    config = yaml.safe_load(render_static_config(dynamic_dir=tmp_path, access_log_path=tmp_path / "a.log"))
    assert {name: ep["address"] for name, ep in config["entryPoints"].items()} == {
        "web": "127.0.0.1:8080",
        "traefik": "127.0.0.1:8081",
    }
    assert config["api"] == {"dashboard": True}  # not insecure: only admin_dynamic_config's router serves it
    assert config["metrics"]["prometheus"]["entryPoint"] == "traefik"
    assert config["metrics"]["prometheus"]["addServicesLabels"] is True
    assert config["global"] == {"checkNewVersion": False, "sendAnonymousUsage": False}
    assert config["providers"]["file"] == {"directory": str(tmp_path), "watch": True}
    assert config["accessLog"]["format"] == "json"
    assert config["accessLog"]["filePath"] == str(tmp_path / "a.log")


def test_traefik_s_api_is_served_on_the_admin_entry_point_behind_the_operator_s_credentials():
    http = yaml.safe_load(render_admin_config("the-operator-token"))["http"]
    (router,) = http["routers"].values()
    assert router["entryPoints"] == ["traefik"] and router["service"] == "api@internal"
    (auth,) = [http["middlewares"][m]["basicAuth"] for m in router["middlewares"]]
    digest = base64.b64encode(hashlib.sha1(b"the-operator-token").digest()).decode()
    assert auth["users"] == [f"operator:{{SHA}}{digest}"]


def test_labels_are_rate_limited_per_client_before_anything_else():
    http = _render(control_plane_url="http://cp:8090", label_rate_per_s=7, label_burst=9)
    first = http["routers"]["feedback"]["middlewares"][0]
    assert http["middlewares"][first] == {"rateLimit": {"average": 7, "period": "1s", "burst": 9}}


def test_every_entry_point_bounds_how_long_a_client_may_take(tmp_path):
    config = yaml.safe_load(render_static_config(dynamic_dir=tmp_path, read_timeout_s=2.5))
    for entry_point in config["entryPoints"].values():
        assert entry_point["transport"]["respondingTimeouts"] == {
            "readTimeout": "2.5s",
            "writeTimeout": "30s",
            "idleTimeout": "60s",
        }
    assert "&id" not in render_static_config(dynamic_dir=tmp_path)  # no YAML anchors shared between them


def test_static_config_uses_the_fast_proxy_unless_told_not_to(tmp_path):
    on = yaml.safe_load(render_static_config(dynamic_dir=tmp_path))
    off = yaml.safe_load(render_static_config(dynamic_dir=tmp_path, fast_proxy=False))
    assert on["experimental"] == {"fastProxy": {}}
    assert "experimental" not in off


def test_the_access_log_keeps_problems_by_default_and_every_request_or_none_when_told(tmp_path):
    def access_log(**options):
        return yaml.safe_load(render_static_config(dynamic_dir=tmp_path, **options)).get("accessLog")

    assert access_log()["filters"] == {
        "statusCodes": ["400-599"],
        "retryAttempts": True,
        "minDuration": "100ms",
    }
    every = access_log(access_log_mode="all")
    assert "filters" not in every and every["format"] == "json"
    assert access_log(access_log_mode="off") is None
    with pytest.raises(ValueError, match="access log mode 'some': expected one of problems, all, off"):
        access_log(access_log_mode="some")


def test_compose_static_config_is_the_rendered_one_for_a_container():
    committed = yaml.safe_load((REPO / "infra/traefik/traefik.yml").read_text())
    rendered = yaml.safe_load(
        render_static_config(
            dynamic_dir="/var/lib/recsys/traefik/dynamic",
            gateway_host="",
            api_host="",
            access_log_path=None,
            user_plugin=True,
        )
    )
    assert committed == rendered


# --- TrafficStore (SQLite here; Postgres in tests/integration) -----------------------------------


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'traffic.db'}"
    migrate(url)
    engine = make_engine(url)
    yield TrafficStore(engine, clock=lambda: 1000.0)
    engine.dispose()


def test_store_is_empty_until_saved_then_returns_every_role(store):
    assert store.load() == Assignment() and store.load().empty
    store.save(Assignment(Slot(1, 90), Slot(2, 10)))
    assert store.load() == Assignment(Slot(1, 90), Slot(2, 10), Slot(None, 0))
    store.save(Assignment(Slot(2, 100)))
    assert store.load() == Assignment(Slot(2, 100))


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (Assignment(Slot(1, -5)), "must not be negative"),
        (Assignment(Slot(None, 100)), "role 'baseline' has weight 100 but no version"),
        (Assignment(Slot(1, 0)), "at least one role must have a positive weight"),
        (Assignment(Slot("1", 100)), "version for 'baseline' must be a non-negative integer"),
    ],
)
def test_store_saves_validated_assignments_only(store, assignment, message):
    with pytest.raises(InvalidWeights) as err:
        store.save(assignment)
    assert message in str(err.value)
    assert store.load().empty


def test_seed_fills_an_empty_table_once(store):
    assert store.seed_if_empty(SPLIT, {"baseline": 1, "canary": 2, "control": 0}) is True
    assert store.load() == Assignment(Slot(1, 85), Slot(2, 10), Slot(0, 5))
    assert store.seed_if_empty({"baseline": 100}, {"baseline": 9}) is False
    assert store.load().baseline == Slot(1, 85)


def test_seed_gives_roles_without_a_version_no_weight_and_waits_for_a_first_version(store):
    assert store.seed_if_empty(SPLIT, {"baseline": None, "canary": None, "control": None}) is False
    assert store.load().empty
    assert store.seed_if_empty(SPLIT, {"baseline": 1}) is True
    assert store.load() == Assignment(Slot(1, 85))


def test_seed_refuses_bad_configured_weights(store):
    with pytest.raises(InvalidWeights, match="unknown role"):
        store.seed_if_empty({"canry": 10, "baseline": 90}, {"baseline": 1})
