"""TraefikCrdRouter against a recording fake of the Kubernetes API, seeded with infra/k8s's gateway objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.traffic.base import Backend, InvalidWeights, TrafficStateUnreadable
from control_plane.traffic.traefik_crd import (
    ROLE_ROUTES,
    Mirror,
    TraefikCrdRouter,
    TrafficWriteConflict,
    role_routes,
    split_services,
)
from tests.k8s_fake import FakeCluster

GATEWAY = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "gateway.yaml"
NS = "recsys"


def backend(version: int) -> Backend:
    return Backend(version, f"http://bento-v{version}.{NS}.svc:3000")


@pytest.fixture
def cluster():
    c = FakeCluster()
    c.load(GATEWAY)
    return c


@pytest.fixture
def router(cluster):
    return TraefikCrdRouter(cluster.clients(), NS)


def split_of(cluster) -> list[tuple[str, int]]:
    return [
        (s["name"], s["weight"])
        for s in cluster.get("traefikservices", "recsys-split")["spec"]["weighted"]["services"]
    ]


def test_the_shipped_seed_reads_as_its_roles_and_weights(router):
    assert router.get_weights() == {"baseline": 85, "canary": 10, "control": 5}
    assert router.get_backends() == {"baseline": backend(2), "canary": backend(3), "control": backend(1)}


def test_the_shipped_role_routes_and_split_are_what_the_router_writes(router, cluster):
    backends, weights = router.get_backends(), router.get_weights()
    assert cluster.get("ingressroutes", ROLE_ROUTES)["spec"]["routes"] == role_routes(backends)
    assert cluster.get("traefikservices", "recsys-split")["spec"]["weighted"]["services"] == split_services(
        backends, weights
    )


def test_new_weights_are_one_merge_patch_of_the_split_carrying_the_version_it_read(router, cluster):
    read_version = cluster.get("traefikservices", "recsys-split")["metadata"]["resourceVersion"]
    router.set_weights({"baseline": 70, "canary": 25, "control": 5})
    (write,) = cluster.writes()
    assert (write.resource, write.verb, write.name) == ("traefikservices", "patch", "recsys-split")
    assert write.body["metadata"]["resourceVersion"] == read_version
    assert split_of(cluster) == [("bento-v2", 70), ("bento-v3", 25), ("bento-v1", 5)]
    assert router.get_weights() == {"baseline": 70, "canary": 25, "control": 5}


def test_the_same_weights_again_write_nothing(router, cluster):
    router.set_weights({"baseline": 85, "canary": 10, "control": 5})
    assert cluster.writes() == []


def test_a_promotion_swaps_roles_and_weights_in_one_patch_then_moves_the_role_routes(router, cluster):
    router.apply({"baseline": backend(3), "canary": None}, {"baseline": 95, "canary": 0, "control": 5})
    split, routes = cluster.writes()
    assert split.name == "recsys-split"
    assert split.body["metadata"]["annotations"] == {"recsys.io/roles": "baseline=3,control=1"}
    assert split_of(cluster) == [("bento-v3", 95), ("bento-v1", 5)]
    assert (routes.resource, routes.name) == ("ingressroutes", ROLE_ROUTES)
    headers = [r["match"].split("X-Model-Role`, `")[1][:-2] for r in routes.body["spec"]["routes"]]
    assert headers == ["baseline", "control"]
    assert routes.body["spec"]["routes"][0]["services"] == [{"name": "bento-v3", "port": 3000}]


def test_a_role_with_weight_but_no_version_is_refused_before_anything_is_written(router, cluster):
    with pytest.raises(InvalidWeights, match="role 'canary' has weight 10 but no backend"):
        router.set_backends({"canary": None})
    assert cluster.writes() == []


def test_a_writer_that_lost_a_race_reads_again_and_applies_over_the_winner(router, cluster):
    real_patch = cluster.patch
    raced = []

    def patch_after_a_rival(group, resource, name, body, content_type):
        if not raced:  # another control plane replica writes between our read and our patch
            raced.append(True)
            cluster.objects[("traefikservices", "recsys-split")]["metadata"]["resourceVersion"] = "rival"
        return real_patch(group, resource, name, body, content_type)

    cluster.patch = patch_after_a_rival
    router.set_weights({"baseline": 70, "canary": 25, "control": 5})
    first, second = cluster.writes()
    assert first.body["metadata"]["resourceVersion"] != "rival"
    assert second.body["metadata"]["resourceVersion"] == "rival"
    assert split_of(cluster) == [("bento-v2", 70), ("bento-v3", 25), ("bento-v1", 5)]


def test_a_split_that_keeps_changing_is_given_up_with_a_message(router, cluster):
    real_patch = cluster.patch

    def always_stale(group, resource, name, body, content_type):
        cluster.objects[("traefikservices", "recsys-split")]["metadata"]["resourceVersion"] += "x"
        return real_patch(group, resource, name, body, content_type)

    cluster.patch = always_stale
    with pytest.raises(TrafficWriteConflict, match="recsys-split changed under 3 attempts"):
        router.set_weights({"baseline": 70, "canary": 25, "control": 5})


def test_the_mirror_copies_a_share_to_a_version_and_stops(router, cluster):
    assert router.get_mirror() is None  # the shipped default mirrors nothing
    router.set_mirror(Mirror(version=4, percent=20))
    assert cluster.get("traefikservices", "recsys-mirror")["spec"]["mirroring"]["mirrors"] == [
        {"name": "bento-v4", "port": 3000, "percent": 20}
    ]
    assert router.get_mirror() == Mirror(4, 20)
    router.set_mirror(None)
    assert router.get_mirror() is None
    assert cluster.get("traefikservices", "recsys-mirror")["spec"]["mirroring"]["name"] == "recsys-split"


@pytest.mark.parametrize("percent", [-1, 101, True, 2.5])
def test_a_mirror_share_must_be_a_percentage(percent):
    with pytest.raises(ValueError, match="mirror percent must be an integer from 0 to 100"):
        Mirror(version=4, percent=percent)


def test_a_namespace_without_the_gateway_says_what_to_apply():
    with pytest.raises(TrafficStateUnreadable, match="traefikservices recsys/recsys-split does not exist"):
        TraefikCrdRouter(FakeCluster().clients(), NS).get_weights()


def test_releasing_a_version_stops_a_mirror_to_it_and_leaves_any_other(router, cluster):
    router.set_mirror(Mirror(version=4, percent=20))
    router.release(3)
    assert router.get_mirror() == Mirror(4, 20)
    router.release(4)
    assert router.get_mirror() is None
    TraefikCrdRouter(FakeCluster().clients(), NS).release(4)  # no mirroring service: nothing to do
