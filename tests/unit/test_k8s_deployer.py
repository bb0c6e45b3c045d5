"""KubernetesDeployer against a recording fake of the Kubernetes API: create, wait for, remove a version."""

from __future__ import annotations

import pytest

from control_plane.deployer.k8s_objects import BentoShape, version_objects
from control_plane.deployer.kubernetes import KubernetesDeployer
from control_plane.errors import DeployFailed
from tests.k8s_fake import FakeCluster


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def make(cluster: FakeCluster, autoscaler: str = "hpa", timeout_s: float = 60) -> KubernetesDeployer:
    clock = Clock()
    return KubernetesDeployer(
        cluster.clients(),
        BentoShape(autoscaler=autoscaler),
        ready_timeout_s=timeout_s,
        clock=clock,
        sleep=clock.sleep,
    )


def test_a_deploy_creates_the_versions_objects_waits_for_a_ready_pod_and_returns_its_url():
    cluster = FakeCluster()
    url = make(cluster).deploy(4)
    assert url == "http://bento-v4.recsys.svc:3000"
    assert [(c.resource, c.verb, c.name) for c in cluster.writes()] == [
        ("services", "create", "bento-v4"),
        ("deployments", "create", "bento-v4"),
        ("poddisruptionbudgets", "create", "bento-v4"),
        ("horizontalpodautoscalers", "create", "bento-v4"),
        ("ingressroutes", "create", "bento-v4"),
    ]
    assert cluster.calls[-1].resource == "deployments/status"
    assert cluster.ready(4) >= 1
    image = cluster.get("deployments", "bento-v4")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "recsys-bento:v4"


def test_with_keda_a_version_gets_a_scaled_object_instead_of_an_hpa():
    cluster = FakeCluster()
    make(cluster, autoscaler="keda").deploy(4)
    kinds = [c.resource for c in cluster.writes()]
    assert "scaledobjects" in kinds and "horizontalpodautoscalers" not in kinds


def test_a_version_that_never_gets_ready_fails_and_leaves_nothing_behind():
    cluster = FakeCluster(never_ready={4})
    with pytest.raises(DeployFailed, match=r"version 4 had 0 of 1 replicas ready after 60 s"):
        make(cluster).deploy(4)
    assert cluster.objects == {}
    assert [c.resource for c in cluster.writes() if c.verb == "delete"] == [
        "ingressroutes", "horizontalpodautoscalers", "poddisruptionbudgets", "deployments", "services",
    ]  # fmt: skip


def test_deploying_a_running_version_again_keeps_the_replicas_and_floor_it_runs_at():
    cluster = FakeCluster()
    deployer = make(cluster)
    deployer.deploy(4)
    deployer.set_floor(4, 6)
    deployer.deploy(4)
    assert cluster.get("deployments", "bento-v4")["spec"]["replicas"] == 6
    assert cluster.get("horizontalpodautoscalers", "bento-v4")["spec"]["minReplicas"] == 6
    patched = [c.body for c in cluster.writes() if c.verb == "patch" and c.resource == "deployments"]
    assert patched and "replicas" not in patched[0]["spec"]


def test_undeploying_removes_every_object_and_a_missing_one_is_no_error():
    cluster = FakeCluster()
    deployer = make(cluster)
    deployer.deploy(4)
    deployer.deploy(5)
    deployer.undeploy(4)
    deployer.undeploy(4)
    assert deployer.endpoints() == {5: "http://bento-v5.recsys.svc:3000"}
    assert {name for (_, name) in cluster.objects} == {"bento-v5"}


def test_a_floor_raises_the_autoscalers_minimum_and_the_replicas_at_once_then_waits_for_them():
    cluster = FakeCluster()
    deployer = make(cluster)
    deployer.deploy(4)
    cluster.calls.clear()
    deployer.set_floor(4, 5)
    deployer.wait_ready(4, 5)
    assert [(c.resource, c.verb, c.body) for c in cluster.writes()] == [
        ("horizontalpodautoscalers", "patch", {"spec": {"minReplicas": 5}}),
        ("deployments/scale", "patch", {"spec": {"replicas": 5}}),
    ]
    assert deployer.ready_replicas(4) == 5


def test_a_lower_floor_leaves_the_replicas_to_the_autoscaler():
    cluster = FakeCluster()
    deployer = make(cluster)
    deployer.deploy(4)
    deployer.set_floor(4, 5)
    cluster.calls.clear()
    deployer.set_floor(4, 2)
    assert [(c.resource, c.body) for c in cluster.writes()] == [
        ("horizontalpodautoscalers", {"spec": {"minReplicas": 2}})
    ]


def test_the_objects_are_created_in_the_order_they_are_listed():
    assert [o.kind for o in version_objects(4, BentoShape())] == [
        "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler", "IngressRoute",
    ]  # fmt: skip


def test_every_call_the_fake_answers_exists_on_the_real_client_with_the_same_arguments(tmp_path):
    """The fake stands in for kubernetes.client: each method the code called must be the real one's."""
    import inspect

    from kubernetes import client

    real = {
        "apps": client.AppsV1Api, "core": client.CoreV1Api, "policy": client.PolicyV1Api,
        "autoscaling": client.AutoscalingV2Api, "custom": client.CustomObjectsApi,
    }  # fmt: skip
    called = {
        ("apps", "create_namespaced_deployment", ("namespace", "body")),
        ("apps", "patch_namespaced_deployment", ("name", "namespace", "body")),
        ("apps", "delete_namespaced_deployment", ("name", "namespace")),
        ("apps", "list_namespaced_deployment", ("namespace",)),
        ("apps", "read_namespaced_deployment_status", ("name", "namespace")),
        ("apps", "patch_namespaced_deployment_scale", ("name", "namespace", "body")),
        ("core", "create_namespaced_service", ("namespace", "body")),
        ("core", "patch_namespaced_service", ("name", "namespace", "body")),
        ("core", "delete_namespaced_service", ("name", "namespace")),
        ("policy", "create_namespaced_pod_disruption_budget", ("namespace", "body")),
        ("policy", "patch_namespaced_pod_disruption_budget", ("name", "namespace", "body")),
        ("policy", "delete_namespaced_pod_disruption_budget", ("name", "namespace")),
        ("autoscaling", "create_namespaced_horizontal_pod_autoscaler", ("namespace", "body")),
        ("autoscaling", "patch_namespaced_horizontal_pod_autoscaler", ("name", "namespace", "body")),
        ("autoscaling", "delete_namespaced_horizontal_pod_autoscaler", ("name", "namespace")),
        ("custom", "create_namespaced_custom_object", ("group", "version", "namespace", "plural", "body")),
        ("custom", "get_namespaced_custom_object", ("group", "version", "namespace", "plural", "name")),
        (
            "custom",
            "patch_namespaced_custom_object",
            ("group", "version", "namespace", "plural", "name", "body"),
        ),
        ("custom", "delete_namespaced_custom_object", ("group", "version", "namespace", "plural", "name")),
    }
    for api, method, params in called:
        signature = inspect.signature(getattr(real[api], method))
        positional = tuple(p for p in signature.parameters if p not in ("self", "kwargs"))
        assert positional == params, f"{api}.{method}{signature}"
        # The real client takes the content type the code forces on every patch.
        if method.startswith("patch"):
            source = inspect.getsource(getattr(real[api], f"{method}_with_http_info"))
            assert "'_content_type'" in source, method
