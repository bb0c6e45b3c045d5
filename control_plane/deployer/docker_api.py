"""The Docker Engine API, the few calls the DockerDeployer makes, over plain HTTP (no docker SDK).

The control plane reaches the engine only through the gate (control_plane/deployer/docker_gate.py), at
a `tcp://host:port` address; a `unix:///path` address talks to a socket directly (the gate itself does).
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from control_plane.errors import DeployFailed

API_VERSION = "v1.41"  # Docker 20.10, the oldest engine this runs on; later engines accept it


class DockerApiError(DeployFailed):
    """The engine (or the gate before it) refused a call; the message is the engine's own."""

    def __init__(self, status: int, method: str, path: str, message: str):
        super().__init__(f"Docker API {method} {path}: {status} {message}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def connection(address: str, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP connection to `tcp://host:port` or `unix:///path`."""
    parts = urllib.parse.urlsplit(address)
    if parts.scheme == "unix":
        return _UnixConnection(parts.path, timeout_s)
    if parts.scheme in ("tcp", "http") and parts.hostname:
        return http.client.HTTPConnection(parts.hostname, parts.port or 2375, timeout=timeout_s)
    raise ValueError(f"Docker address {address!r}: expected tcp://host:port or unix:///path")


@dataclass(frozen=True)
class ContainerState:
    """What the deployer needs of `GET /containers/{name}/json`."""

    name: str
    running: bool
    restart_count: int
    status: str


class DockerApi:
    """A handful of Engine API calls; every failure is a DockerApiError naming the call."""

    def __init__(self, address: str, timeout_s: float = 30.0):
        self.address = address
        self.timeout_s = timeout_s

    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        url = f"/{API_VERSION}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        conn = connection(self.address, timeout_s or self.timeout_s)
        try:
            headers = {"Content-Type": content_type} if body is not None else {}
            conn.request(method, url, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as exc:
            raise DockerApiError(0, method, path, f"unreachable at {self.address}: {exc}") from exc
        finally:
            conn.close()

    def _ok(self, method: str, path: str, *, allow: tuple[int, ...] = (), **kw: Any) -> tuple[int, bytes]:
        status, data = self._call(method, path, **kw)
        if status >= 300 and status not in allow:
            raise DockerApiError(status, method, path, _message(data))
        return status, data

    def ping(self) -> bool:
        try:
            return self._call("GET", "/_ping", timeout_s=3)[0] == 200
        except DockerApiError:
            return False

    def image_labels(self, image: str) -> dict[str, str] | None:
        """The image's labels, or None when there is no such image."""
        status, data = self._ok("GET", f"/images/{image}/json", allow=(404,))
        if status == 404:
            return None
        return dict((json.loads(data).get("Config") or {}).get("Labels") or {})

    def build(self, tag: str, context_tar: bytes, buildargs: dict[str, str], labels: dict[str, str]) -> None:
        """`POST /build` from an uncompressed tar whose root holds the Dockerfile; waits for the end."""
        query = {
            "t": tag,
            "rm": "1",
            "forcerm": "1",
            "buildargs": json.dumps(buildargs),
            "labels": json.dumps(labels),
        }
        _, data = self._ok(
            "POST", "/build", query=query, body=context_tar, content_type="application/x-tar", timeout_s=600
        )
        for line in data.decode(errors="replace").splitlines():  # the engine streams JSON lines
            line = line.strip()
            if line.startswith("{") and '"error"' in line:
                raise DockerApiError(200, "POST", "/build", json.loads(line).get("error", line))

    def create(self, name: str, spec: dict[str, Any]) -> None:
        self._ok("POST", "/containers/create", query={"name": name}, body=json.dumps(spec).encode())

    def start(self, name: str) -> None:
        self._ok("POST", f"/containers/{name}/start", allow=(304,))

    def stop(self, name: str, timeout_s: int) -> None:
        self._ok(
            "POST",
            f"/containers/{name}/stop",
            query={"t": str(timeout_s)},
            allow=(304, 404),
            timeout_s=timeout_s + 30,
        )

    def remove(self, name: str) -> None:
        self._ok("DELETE", f"/containers/{name}", query={"force": "1"}, allow=(404,))

    def remove_image(self, image: str) -> str | None:
        """`DELETE /images/{image}` without force: None once removed, else why not (404 none, 409 in use)."""
        status, data = self._ok("DELETE", f"/images/{image}", allow=(404, 409))
        return None if status < 300 else f"{status} {_message(data)}"

    def state(self, name: str) -> ContainerState | None:
        status, data = self._ok("GET", f"/containers/{name}/json", allow=(404,))
        if status == 404:
            return None
        info = json.loads(data)
        st = info.get("State") or {}
        return ContainerState(
            name=info.get("Name", name).lstrip("/"),
            running=bool(st.get("Running")),
            restart_count=int(info.get("RestartCount") or 0),
            status=str(st.get("Status", "")),
        )

    def containers(self, label: str) -> list[str]:
        """Names of the containers (running or not) carrying `label`."""
        query = {"all": "1", "filters": json.dumps({"label": [label]})}
        _, data = self._ok("GET", "/containers/json", query=query)
        return [c["Names"][0].lstrip("/") for c in json.loads(data) if c.get("Names")]

    def logs_tail(self, name: str, lines: int = 5) -> str:
        """The last lines the container wrote (stdout and stderr), for an error a person reads."""
        query = {"stdout": "1", "stderr": "1", "tail": str(lines)}
        status, data = self._call("GET", f"/containers/{name}/logs", query=query)
        return _demux(data).strip() if status == 200 else ""


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", data.decode(errors="replace")))
    except (ValueError, AttributeError):
        return data.decode(errors="replace").strip()


def _demux(data: bytes) -> str:
    """A non-TTY container's log stream: 8-byte frame headers (stream, 0, 0, 0, size) before each chunk."""
    out, i = [], 0
    while i + 8 <= len(data) and data[i] in (0, 1, 2):
        size = int.from_bytes(data[i + 4 : i + 8], "big")
        out.append(data[i + 8 : i + 8 + size])
        i += 8 + size
    return b"".join(out).decode(errors="replace") if out else data.decode(errors="replace")
