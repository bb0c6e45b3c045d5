"""The Docker gate's rules: what the DockerDeployer needs passes, anything that would reach the host does not."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from control_plane.deployer.docker import DockerDeployer, bento_context
from control_plane.deployer.docker_gate import BENTO_DOCKERFILE, GateConfig, GateRequest, check, split_target
from control_plane.settings import Settings

CFG = GateConfig(
    project="recsys",
    network="recsys_default",
    app_image="recsys-app:0.1.0",
    dockerfile=BENTO_DOCKERFILE.read_bytes(),
)
SETTINGS = Settings(docker_host="tcp://docker-gate:2375")


def req(method: str, target: str, body: bytes = b"") -> GateRequest:
    parsed = split_target(target)
    return GateRequest(method, parsed.path, parsed.query, body)


def create(spec: dict, name: str = "recsys-bento-v3") -> GateRequest:
    return req("POST", f"/v1.41/containers/create?name={name}", json.dumps(spec).encode())


def test_the_deployers_own_container_spec_passes_and_is_stamped_for_compose():
    verdict = check(create(DockerDeployer(SETTINGS).spec(3)), CFG)
    assert verdict.allowed, verdict.reason
    sent = json.loads(verdict.body)
    assert sent["Labels"]["com.docker.compose.project"] == "recsys"
    assert sent["Labels"]["recsys.bento"] == "3"
    assert sent["NetworkingConfig"] == {"EndpointsConfig": {"recsys_default": {"Aliases": ["bento-v3"]}}}
    assert sent["HostConfig"]["ReadonlyRootfs"] is True
    # its one mount: the project's spill volume, a directory per version in it
    assert sent["HostConfig"]["Mounts"] == [
        {"Type": "volume", "Source": "recsys_bento-spill", "Target": "/var/spool/recsys"}
    ]
    assert "RECSYS_SPILL_DIR=/var/spool/recsys/v3" in sent["Env"]


@pytest.mark.parametrize(
    "change",
    [
        {"HostConfig": {"NetworkMode": "recsys_default", "Binds": ["/:/host"]}},
        {"HostConfig": {"NetworkMode": "recsys_default", "Privileged": True}},
        {"HostConfig": {"NetworkMode": "recsys_default", "PortBindings": {"3000/tcp": [{"HostPort": "80"}]}}},
        {"HostConfig": {"NetworkMode": "host"}},
        {"HostConfig": {"NetworkMode": "recsys_default", "SecurityOpt": ["seccomp=unconfined"]}},
        {"HostConfig": {"NetworkMode": "recsys_default", "Tmpfs": {"/etc": ""}}},
        {
            "HostConfig": {
                "NetworkMode": "recsys_default",
                "Mounts": [{"Type": "bind", "Source": "/", "Target": "/h"}],
            }
        },
        {
            "HostConfig": {
                "NetworkMode": "recsys_default",
                "Mounts": [{"Type": "volume", "Source": "other_data", "Target": "/var/spool/recsys"}],
            }
        },
        {
            "HostConfig": {
                "NetworkMode": "recsys_default",
                "Mounts": [{"Type": "volume", "Source": "recsys_bento-spill", "Target": "/etc"}],
            }
        },
        {
            "HostConfig": {
                "NetworkMode": "recsys_default",
                "Mounts": [
                    {
                        "Type": "volume",
                        "Source": "recsys_bento-spill",
                        "Target": "/var/spool/recsys",
                        "VolumeOptions": {
                            "DriverConfig": {
                                "Name": "local",
                                "Options": {"type": "none", "o": "bind", "device": "/"},
                            }
                        },
                    }
                ],
            }
        },
        {"Image": "debian:bookworm"},
        {"Image": "recsys-bento:v4"},
        {"Entrypoint": ["/bin/sh"]},
        {"User": "0"},
    ],
)
def test_a_container_that_could_reach_the_host_is_refused(change):
    spec = {**DockerDeployer(SETTINGS).spec(3), **change}
    verdict = check(create(spec), CFG)
    assert not verdict.allowed


def test_only_this_projects_bento_containers_can_be_named_or_touched():
    assert not check(create(DockerDeployer(SETTINGS).spec(3), name="other-bento-v3"), CFG).allowed
    assert check(req("POST", "/v1.41/containers/recsys-bento-v3/stop?t=10"), CFG).allowed
    assert check(req("DELETE", "/v1.41/containers/recsys-bento-v3?force=1"), CFG).allowed
    assert not check(req("POST", "/v1.41/containers/recsys-postgres-1/stop"), CFG).allowed
    assert not check(req("POST", "/v1.41/containers/recsys-bento-v3/exec", b"{}"), CFG).allowed
    assert not check(req("GET", "/v1.41/containers/recsys-bento-v3/logs?follow=1"), CFG).allowed
    for target in ("/v1.41/images/create?fromImage=x", "/v1.41/volumes", "/v1.41/networks", "/v1.41/info"):
        assert not check(req("GET", target), CFG).allowed
        assert not check(req("POST", target), CFG).allowed


def test_listing_is_narrowed_to_this_projects_bentos():
    verdict = check(req("GET", '/v1.41/containers/json?all=1&filters={"label":["anything"]}'), CFG)
    forwarded = split_target(verdict.path)
    assert json.loads(forwarded.query["filters"]) == {
        "label": ["com.docker.compose.project=recsys", "recsys.bento"]
    }


def _build(context: bytes, tag: str = "recsys-bento:v3", args: dict | None = None) -> GateRequest:
    q = f"t={tag}&rm=1&buildargs={json.dumps(args or {'APP_IMAGE': 'recsys-app:0.1.0'})}&labels={{}}"
    return req("POST", f"/v1.41/build?{q}", context)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_only_the_projects_bento_dockerfile_is_built(tmp_path):
    (tmp_path / "bento.yaml").write_text("name: recsys\n")
    context = bento_context(tmp_path)
    assert check(_build(context), CFG).allowed
    assert not check(_build(context, tag="recsys-app:0.1.0"), CFG).allowed
    assert not check(_build(context, args={"APP_IMAGE": "debian:bookworm"}), CFG).allowed
    evil = _tar({"Dockerfile": b"FROM recsys-app:0.1.0\nRUN id\n"})
    assert not check(_build(evil), CFG).allowed
    assert not check(req("POST", "/v1.41/build?t=recsys-bento:v3&networkmode=host", context), CFG).allowed


def test_a_bento_image_can_be_removed_never_forced_and_no_other_image():
    verdict = check(req("DELETE", "/v1.41/images/recsys-bento:v3"), CFG)
    assert verdict.allowed and verdict.path == "/images/recsys-bento:v3"
    assert check(req("DELETE", "/v1.41/images/recsys-bento%3Av12"), CFG).allowed
    for target in (
        "/v1.41/images/recsys-bento:v3?force=1",
        "/v1.41/images/recsys-bento:v3?noprune=1",
        "/v1.41/images/recsys-bento:v3?force=0",
        "/v1.41/images/recsys-app:0.1.0",
        "/v1.41/images/recsys-postgres:bookworm",
        "/v1.41/images/recsys-bento:latest",
        "/v1.41/images/recsys-bento",
        "/v1.41/images/sha256:0123456789abcdef",
        "/v1.41/images/other/recsys-bento:v3",
        "/v1.41/images/recsys-bento:v3%0A",
        "/v1.41/images/recsys-bento:v3/json",
        "/v1.41/images/prune",
    ):
        assert not check(req("DELETE", target), CFG).allowed, target
    assert not check(req("POST", "/v1.41/images/prune"), CFG).allowed


def test_a_built_image_is_stamped_with_the_project(tmp_path):
    (tmp_path / "bento.yaml").write_text("name: recsys\n")
    q = f"t=recsys-bento:v3&buildargs={json.dumps({'APP_IMAGE': 'recsys-app:0.1.0'})}"
    for labels in ("", '&labels={"recsys.model_version":"3","recsys.project":"other"}'):
        verdict = check(req("POST", f"/v1.41/build?{q}{labels}", bento_context(tmp_path)), CFG)
        assert verdict.allowed, verdict.reason
        sent = json.loads(split_target(verdict.path).query["labels"])
        assert sent["recsys.project"] == "recsys"
        assert sent.get("recsys.model_version") == ("3" if labels else None)
