"""The deployer and the router through the real `kubernetes` client, against the fake cluster over HTTP.

The other k8s tests hand the code a Python fake; this one checks what the real client puts on the
wire for the same calls: the paths, the bodies, and that every patch is sent as a JSON merge patch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.deployer.k8s_objects import BentoShape
from control_plane.deployer.kubernetes import KubernetesDeployer
from control_plane.errors import DeployFailed
from control_plane.k8s_client import MERGE_PATCH, kube_clients
from control_plane.traffic.base import Backend
from control_plane.traffic.traefik_crd import Mirror, TraefikCrdRouter
from tests.k8s_api_server import parse_path, serving
from tests.k8s_fake import FakeCluster

GATEWAY = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "gateway.yaml"


@pytest.mark.parametrize(
    "path, parsed",
    [
        ("/api/v1/namespaces/recsys/services/bento-v4", ("", "services", "bento-v4", "")),
        ("/apis/apps/v1/namespaces/recsys/deployments", ("apps", "deployments", "", "")),
        (
            "/apis/apps/v1/namespaces/recsys/deployments/bento-v4/scale",
            ("apps", "deployments", "bento-v4", "scale"),
        ),
        (
            "/apis/traefik.io/v1alpha1/namespaces/recsys/traefikservices/x",
            ("traefik.io", "traefikservices", "x", ""),
        ),
    ],
)
def test_api_paths_name_the_group_resource_and_object(path, parsed):
    assert parse_path(path) == parsed


@pytest.mark.parametrize("autoscaler", ["hpa", "keda"])
def test_a_version_deployed_scaled_and_removed_through_the_real_client(autoscaler):
    cluster = FakeCluster()
    with serving(cluster) as (url, content_types):
        deployer = KubernetesDeployer(kube_clients(url), BentoShape(autoscaler=autoscaler), poll_s=0)
        assert deployer.deploy(4) == "http://bento-v4.recsys.svc:3000"
        assert deployer.endpoints() == {4: "http://bento-v4.recsys.svc:3000"}
        deployer.deploy(4)  # again: each object already there is patched, not recreated
        deployer.set_floor(4, 3)
        deployer.wait_ready(4, 3)
        assert deployer.ready_replicas(4) == 3
        deployer.undeploy(4)
        assert deployer.endpoints() == {}
    assert cluster.objects == {}
    assert content_types and set(content_types) == {MERGE_PATCH}
    scaler = "scaledobjects" if autoscaler == "keda" else "horizontalpodautoscalers"
    assert (scaler, "patch") in {(c.resource, c.verb) for c in cluster.calls}


def test_a_version_that_never_gets_ready_fails_through_the_real_client():
    cluster = FakeCluster(never_ready={4})
    with serving(cluster) as (url, _):
        deployer = KubernetesDeployer(kube_clients(url), BentoShape(), ready_timeout_s=0.2, poll_s=0.05)
        with pytest.raises(DeployFailed, match="version 4 had 0 of 1 replicas ready"):
            deployer.deploy(4)
    assert cluster.objects == {}


def test_weights_roles_and_the_mirror_through_the_real_client():
    cluster = FakeCluster()
    cluster.load(GATEWAY)
    with serving(cluster) as (url, content_types):
        router = TraefikCrdRouter(kube_clients(url), "recsys")
        assert router.get_weights() == {"baseline": 85, "canary": 10, "control": 5}
        router.apply(
            {"baseline": Backend(3, "http://bento-v3.recsys.svc:3000"), "canary": None},
            {"baseline": 95, "canary": 0, "control": 5},
        )
        assert router.get_weights() == {"baseline": 95, "canary": 0, "control": 5}
        assert router.get_backends()["baseline"].version == 3
        router.set_mirror(Mirror(version=3, percent=5))
        assert router.get_mirror() == Mirror(3, 5)
    assert set(content_types) == {MERGE_PATCH}
    assert [(c.resource, c.name) for c in cluster.writes()] == [
        ("traefikservices", "recsys-split"),
        ("ingressroutes", "recsys-role-overrides"),
        ("traefikservices", "recsys-mirror"),
    ]
