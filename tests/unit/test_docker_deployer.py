"""The DockerDeployer's retirement on the wire: container stopped and removed, then its image, not forced."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from control_plane.deployer.docker import DockerDeployer
from control_plane.deployer.docker_api import DockerApi
from control_plane.deployer.docker_gate import (
    BENTO_DOCKERFILE,
    GateConfig,
    GateRequest,
    check,
    split_target,
)
from control_plane.settings import Settings


@dataclass
class FakeEngine:
    """Answers every call 200 with `[]`, except DELETE /images/... with `image_status`; records the calls."""

    image_status: int = 200
    calls: list[tuple[str, str]] = field(default_factory=list)


@contextmanager
def serving(engine: FakeEngine) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            engine.calls.append((self.command, self.path))
            status = engine.image_status if self.command == "DELETE" and "/images/" in self.path else 200
            data = json.dumps([] if status < 300 else {"message": "conflict: image is being used"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


GATE = GateConfig("recsys", "recsys_default", "recsys-app:0.1.0", dockerfile=BENTO_DOCKERFILE.read_bytes())


@pytest.mark.parametrize("image_status, kept", [(200, False), (404, True), (409, True)])
def test_a_retired_versions_image_is_removed_after_its_container(tmp_path, caplog, image_status, kept):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    engine = FakeEngine(image_status)
    with serving(engine) as address, caplog.at_level(logging.INFO, "control_plane.deployer.docker"):
        DockerDeployer(settings, DockerApi(address)).undeploy(3)
    calls = [_request(method, target) for method, target in engine.calls]
    assert [(c.method, c.path) for c in calls[:2]] == [
        ("POST", "/containers/recsys-bento-v3/stop"),
        ("DELETE", "/containers/recsys-bento-v3"),
    ]
    assert calls[-1] == GateRequest("DELETE", "/images/recsys-bento:v3", {})  # last, and never forced
    assert all(check(c, GATE).allowed for c in calls), "the gate lets every one of these calls through"
    assert ("kept image" in caplog.text) == kept


def test_an_image_the_engine_fails_to_remove_does_not_stop_the_retirement(tmp_path, caplog):
    settings = Settings.from_env({"RECSYS_STATE_DIR": str(tmp_path)})
    with (
        serving(FakeEngine(500)) as address,
        caplog.at_level(logging.WARNING, "control_plane.deployer.docker"),
    ):
        DockerDeployer(settings, DockerApi(address)).undeploy(3)
    assert "could not remove image" in caplog.text


def _request(method: str, target: str) -> GateRequest:
    parsed = split_target(target)
    return GateRequest(method, parsed.path, parsed.query)
