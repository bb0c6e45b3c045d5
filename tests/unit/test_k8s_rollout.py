"""A whole rollout on Kubernetes fakes: the same service layer and decide() as on one machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from control_plane import services
from control_plane.analysis.types import Phase
from control_plane.context import Context, kubernetes_parts
from control_plane.db.engine import make_engine, migrate
from control_plane.log_backlog import InMemoryLogBacklog
from control_plane.registry.memory import InMemoryRegistry
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.settings import Settings
from control_plane.traffic.traefik_crd import Mirror, child_name
from control_plane.traffic.user_assignment import PLUGIN_ALIAS, sticky_cookie_value
from control_plane.traffic_ops import apply_assignment
from tests.k8s_fake import FakeCluster
from tests.traffic_rows import FAST_POLICY
from tests.unit.test_services import Clock, seed_tick

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
BUSY_BASELINE = 8  # replicas the baseline's autoscaler gave it for the traffic it serves


def k8s_context(
    tmp_path, cluster: FakeCluster, autoscaler: str = "hpa", user_assignment: bool = True
) -> Context:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    registry = InMemoryRegistry()
    for profile in ("control", "baseline", "better", "worse"):
        registry.add_version(profile=profile)
    registry.set_alias("control", 1)
    registry.set_alias("baseline", 2)
    settings = Settings(
        state_dir=tmp_path,
        database_url=url,
        label_window_s=0,
        deployer="kubernetes",
        k8s_autoscaler=autoscaler,
        user_assignment=user_assignment,
    )
    router, deployer = kubernetes_parts(settings, clients=cluster.clients())
    deployer.sleep = lambda s: None
    ctx = Context(
        settings=settings, engine=make_engine(url), registry=registry, router=router, deployer=deployer,
        clock=Clock(), sleep=lambda s: None, log_backlog=InMemoryLogBacklog(),
    )  # fmt: skip
    cluster.load(K8S / "base" / "gateway.yaml")
    ctx.deployer.deploy(1)
    ctx.deployer.deploy(2)
    apply_assignment(ctx, Assignment(baseline=Slot(2, 95), control=Slot(1, 5)))
    baseline = cluster.get("deployments", "bento-v2")
    baseline["spec"]["replicas"] = baseline["status"]["readyReplicas"] = BUSY_BASELINE
    cluster.calls.clear()
    return ctx


@pytest.fixture
def cluster():
    return FakeCluster()


@pytest.fixture
def ctx(tmp_path, cluster):
    c = k8s_context(tmp_path, cluster)
    yield c
    c.engine.dispose()


def drive(ctx, rollout_id: int, accuracy: dict[int, float]) -> list[str]:
    actions = []
    for tick in range(1, 12):
        seed_tick(ctx, 3000, accuracy=accuracy)
        actions.append(services.evaluate(ctx, tick=tick)["action"])
        if ctx.ledger.get(rollout_id).phase.terminal:
            break
    return actions


def user_arms(middleware_spec: dict) -> dict[str, int]:
    """The userassign plugin's weights by the version's Service its arm's cookie names (v1 to v9)."""
    services = {sticky_cookie_value(child_name("recsys", v)): f"bento-v{v}" for v in range(1, 10)}
    arms = middleware_spec["plugin"][PLUGIN_ALIAS]["arms"]
    return {services[a["cookie"]]: a["weight"] for a in arms}


def write_log(cluster: FakeCluster) -> list[tuple]:
    """Every write, compactly: what the split and the floors were set to, what was created or removed."""
    out = []
    for c in cluster.writes():
        if c.resource == "traefikservices" and c.name == "recsys-mirror":
            out.append(("mirror", [m["name"] for m in c.body["spec"]["mirroring"]["mirrors"]]))
        elif c.resource == "traefikservices":
            split = {s["name"]: s["weight"] for s in c.body["spec"]["weighted"]["services"]}
            out.append(("split", split))
        elif c.resource == "middlewares":
            out.append(("users", user_arms(c.body["spec"])))
        elif c.resource in ("horizontalpodautoscalers", "scaledobjects") and c.verb == "patch":
            out.append(("floor", c.name, next(iter(c.body["spec"].values()))))
        elif c.resource == "deployments/scale":
            out.append(("scale", c.name, c.body["spec"]["replicas"]))
        elif c.resource == "ingressroutes" and c.verb == "patch":
            out.append(("role routes", [r["services"][0]["name"] for r in c.body["spec"]["routes"]]))
        else:
            out.append((c.verb, c.resource, c.name))
    return out


CREATE_V3 = [
    ("create", "services", "bento-v3"),
    ("create", "deployments", "bento-v3"),
    ("create", "poddisruptionbudgets", "bento-v3"),
    ("create", "horizontalpodautoscalers", "bento-v3"),
    ("create", "ingressroutes", "bento-v3"),
]
REMOVE_V2 = [
    ("delete", "ingressroutes", "bento-v2"),
    ("delete", "horizontalpodautoscalers", "bento-v2"),
    ("delete", "poddisruptionbudgets", "bento-v2"),
    ("delete", "deployments", "bento-v2"),
    ("delete", "services", "bento-v2"),
]


def test_a_promoted_rollout_issues_exactly_the_designed_writes_in_order(ctx, cluster):
    rollout = services.start_canary(ctx, 3, FAST_POLICY, actor="test")
    actions = drive(ctx, rollout.id, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
    assert actions[-1] == "promote" and actions.count("advance") == 2, actions
    assert ctx.ledger.get(rollout.id).phase is Phase.PROMOTED
    # The fleet is read off the busiest version: 8 baseline replicas at 95 % -> 9 for all traffic; at 85 %
    # -> 10; at 70 % -> 12; at the last step the canary's 6 at 50 % -> 12. A share s needs ceil(fleet*s/100).
    assert write_log(cluster) == [
        *CREATE_V3,
        ("floor", "bento-v2", 8),  # the baseline is held at its share (85 % of 9) while a canary runs
        ("users", {"bento-v2": 85, "bento-v3": 10, "bento-v1": 5}),  # the plugin's weights just before
        ("split", {"bento-v2": 85, "bento-v3": 10, "bento-v1": 5}),
        ("role routes", ["bento-v2", "bento-v3", "bento-v1"]),
        ("floor", "bento-v3", 3),  # the canary's floor first (25 % of 10), and its replicas ...
        ("scale", "bento-v3", 3),
        ("users", {"bento-v2": 70, "bento-v3": 25, "bento-v1": 5}),
        ("split", {"bento-v2": 70, "bento-v3": 25, "bento-v1": 5}),  # ... ready before it gets 25 %
        ("floor", "bento-v2", 7),  # the baseline lowered only after it gave the share away
        ("floor", "bento-v3", 6),  # 50 % of 12
        ("scale", "bento-v3", 6),
        ("users", {"bento-v2": 45, "bento-v3": 50, "bento-v1": 5}),
        ("split", {"bento-v2": 45, "bento-v3": 50, "bento-v1": 5}),
        ("floor", "bento-v2", 6),
        ("floor", "bento-v3", 10),  # promotion: the new baseline scaled to its whole share first (max 10)
        ("scale", "bento-v3", 10),
        ("users", {"bento-v3": 95, "bento-v1": 5}),
        ("split", {"bento-v3": 95, "bento-v1": 5}),
        ("role routes", ["bento-v3", "bento-v1"]),
        ("floor", "bento-v2", 2),  # then every floor is the autoscaler's minimum again
        ("floor", "bento-v3", 2),
        *REMOVE_V2,  # the old baseline, drained, is removed
    ]


def test_a_promotion_waits_for_the_new_baseline_to_be_ready_before_it_takes_the_traffic(ctx, cluster):
    rollout = services.start_canary(ctx, 3, FAST_POLICY, actor="test")
    drive(ctx, rollout.id, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
    promotion = next(
        i for i, c in enumerate(cluster.calls)
        if c.resource == "traefikservices" and c.verb == "patch"
        and [s["name"] for s in c.body["spec"]["weighted"]["services"]] == ["bento-v3", "bento-v1"]
    )  # fmt: skip
    scaled = next(
        i
        for i, c in enumerate(cluster.calls)
        if c.resource == "deployments/scale" and c.body["spec"]["replicas"] == 10
    )
    reads = [
        c
        for c in cluster.calls[scaled:promotion]
        if c.resource == "deployments/status" and c.name == "bento-v3"
    ]
    assert scaled < promotion
    assert len(reads) == 10 - 6, "polled until all 10 were ready (the fake readies one pod a read, from 6)"
    assert cluster.ready(3) == 10


def test_a_rolled_back_canary_gives_its_share_back_to_a_baseline_raised_first(ctx, cluster):
    rollout = services.start_canary(ctx, 4, FAST_POLICY, actor="test")
    actions = drive(ctx, rollout.id, accuracy={1: 0.75, 2: 0.80, 4: 0.50})
    assert actions[-1] == "rollback", actions
    log = write_log(cluster)
    back = log.index(("split", {"bento-v2": 95, "bento-v1": 5}))
    # The baseline's floor covers its whole share (95 % of a fleet of 10) before it takes the share back,
    # and the canary's users are sent back to it (the plugin's weights) just before the split moves.
    assert log[back - 3 : back] == [
        ("floor", "bento-v2", 10),
        ("scale", "bento-v2", 10),
        ("users", {"bento-v2": 95, "bento-v1": 5}),
    ]
    assert ("delete", "deployments", "bento-v4") in log[back:]


def role_permissions() -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((K8S / "base" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_role_grants_exactly_the_calls_the_control_plane_makes(tmp_path):
    used = set()
    for autoscaler in ("hpa", "keda"):
        cluster = FakeCluster()
        ctx = k8s_context(tmp_path / autoscaler, cluster, autoscaler=autoscaler)
        promoted = services.start_canary(ctx, 3, FAST_POLICY, actor="test")
        drive(ctx, promoted.id, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
        rolled_back = services.start_canary(ctx, 4, FAST_POLICY, actor="test")
        drive(ctx, rolled_back.id, accuracy={1: 0.75, 3: 0.80, 4: 0.50})
        services.deploy_role(ctx, 3, "baseline", actor="test")  # a running version deployed again
        ctx.router.inner.set_mirror(Mirror(version=3, percent=10))
        ctx.router.inner.get_mirror()
        services.versions(ctx)
        used |= {c.permission for c in cluster.calls}
        ctx.engine.dispose()
    assert role_permissions() == used


def test_settings_choose_the_kubernetes_deployer_and_the_crd_router(tmp_path, monkeypatch):
    from control_plane import context, k8s_client
    from control_plane.deployer.kubernetes import KubernetesDeployer
    from control_plane.traffic.scaling_router import ScalingRouter
    from control_plane.traffic.traefik_crd import TraefikCrdRouter

    cluster = FakeCluster(namespace="models")
    monkeypatch.setattr(k8s_client, "kube_clients", cluster.clients)
    settings = Settings.from_env(
        {
            "RECSYS_STATE_DIR": str(tmp_path),
            "RECSYS_DEPLOYER": "kubernetes",
            "RECSYS_K8S_NAMESPACE": "models",
            "RECSYS_K8S_AUTOSCALER": "keda",
            "RECSYS_K8S_MIN_REPLICAS": "3",
            "RECSYS_USER_ASSIGNMENT": "off",
        }
    )
    ctx = context.bootstrap(settings)
    assert isinstance(ctx.deployer, KubernetesDeployer) and isinstance(ctx.router, ScalingRouter)
    assert isinstance(ctx.router.inner, TraefikCrdRouter) and ctx.router.inner.namespace == "models"
    assert ctx.router.inner.user_assignment is False
    assert (ctx.deployer.shape.autoscaler, ctx.deployer.shape.min_replicas, ctx.router.min_replicas) == (
        "keda",
        3,
        3,
    )
    ctx.engine.dispose()


def test_an_unknown_deployer_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="RECSYS_DEPLOYER='k8s': expected one of auto, kubernetes"):
        Settings.from_env({"RECSYS_DEPLOYER": "k8s"})


def test_no_other_process_imports_the_kubernetes_client():
    import subprocess
    import sys

    code = (
        "import sys, control_plane.cli, control_plane.context, control_plane.web.app, control_plane.jobs;"
        "import control_plane.deployer.kubernetes, control_plane.traffic.traefik_crd;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_a_mirror_to_a_rolled_back_canary_is_stopped_before_its_service_goes(ctx, cluster):
    rollout = services.start_canary(ctx, 4, FAST_POLICY, actor="test")
    ctx.router.inner.set_mirror(Mirror(version=4, percent=10))
    drive(ctx, rollout.id, accuracy={1: 0.75, 2: 0.80, 4: 0.50})
    log = write_log(cluster)
    assert log.index(("mirror", [])) < log.index(("delete", "services", "bento-v4"))
    assert ctx.router.inner.get_mirror() is None


def test_the_user_assignment_middleware_moves_in_step_with_every_split(ctx, cluster):
    promoted = services.start_canary(ctx, 3, FAST_POLICY, actor="test")
    drive(ctx, promoted.id, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
    rolled_back = services.start_canary(ctx, 4, FAST_POLICY, actor="test")
    drive(ctx, rolled_back.id, accuracy={1: 0.75, 3: 0.80, 4: 0.50})
    log = write_log(cluster)
    splits = [i for i, entry in enumerate(log) if entry[0] == "split"]
    assert [log[i][1] for i in splits] == [
        {"bento-v2": 85, "bento-v3": 10, "bento-v1": 5},
        {"bento-v2": 70, "bento-v3": 25, "bento-v1": 5},
        {"bento-v2": 45, "bento-v3": 50, "bento-v1": 5},
        {"bento-v3": 95, "bento-v1": 5},  # promoted
        {"bento-v3": 85, "bento-v4": 10, "bento-v1": 5},
        {"bento-v3": 95, "bento-v1": 5},  # rolled back
    ]
    for i in splits:
        assert log[i - 1] == ("users", log[i][1]), log[i - 1 : i + 1]
    assert sum(entry[0] == "users" for entry in log) == len(splits)
    # What Traefik holds at the end: the plugin's arms name the split's children with the split's weights.
    split = cluster.get("traefikservices", "recsys-split")["spec"]["weighted"]
    assert user_arms(cluster.get("middlewares", "recsys-user-assign")["spec"]) == {
        s["name"]: s["weight"] for s in split["services"]
    }
    assert split["sticky"]["cookie"]["name"] == "recsys_arm"


def test_with_user_assignment_off_the_middleware_is_left_and_the_split_ignores_its_cookie(tmp_path):
    cluster = FakeCluster()
    ctx = k8s_context(tmp_path, cluster, user_assignment=False)  # RECSYS_USER_ASSIGNMENT=off
    shipped = yaml.safe_load_all((K8S / "base" / "gateway.yaml").read_text())
    (shipped,) = [d for d in shipped if d["metadata"]["name"] == "recsys-user-assign"]
    rollout = services.start_canary(ctx, 3, FAST_POLICY, actor="test")
    drive(ctx, rollout.id, accuracy={1: 0.7, 2: 0.70, 3: 0.90})
    assert not cluster.writes("middlewares")
    assert cluster.get("middlewares", "recsys-user-assign")["spec"] == shipped["spec"]
    assert "sticky" not in cluster.get("traefikservices", "recsys-split")["spec"]["weighted"]
    ctx.engine.dispose()
