"""The fake cluster behind HTTP on 127.0.0.1, so that the real `kubernetes` client can be driven against it.

Only the REST paths the deployer and the router use: /api/v1/... (core) and /apis/<group>/<version>/...,
namespaced, with create (POST), get and list (GET), patch (PATCH, Content-Type as sent) and delete.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from kubernetes.client.exceptions import ApiException

from tests.k8s_fake import FakeCluster


def parse_path(path: str) -> tuple[str, str, str, str]:
    """(group, resource, name, subresource) of a namespaced API path."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":  # /api/v1/namespaces/<ns>/<resource>[/<name>[/<sub>]]
        group, rest = "", parts[4:]
    else:  # /apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>[/<sub>]]
        group, rest = parts[1], parts[5:]
    resource, name, sub = (rest + ["", ""])[:3]
    return group, resource, name, sub


class _Handler(BaseHTTPRequestHandler):
    cluster: FakeCluster
    content_types: list[str]

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def _answer(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        group, resource, name, sub = parse_path(url.path)
        c = self.cluster
        try:
            if method == "POST":
                return self._answer(201, c.create(group, resource, self._body()))
            if method == "GET" and not name:
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                return self._answer(200, {"kind": "DeploymentList", "items": c.list_deployments(selector)})
            if method == "GET" and sub == "status":
                return self._answer(200, c.deployment_status(name))
            if method == "GET":
                return self._answer(200, c.read(group, resource, name))
            if method == "PATCH":
                content_type = self.headers.get("Content-Type", "")
                self.content_types.append(content_type)
                full = f"{resource}/{sub}" if sub else resource
                patched = c.patch(group, full, name, self._body(), content_type)
                if sub == "scale":  # the scale subresource answers with a Scale, not the Deployment
                    replicas = patched["spec"]["replicas"]
                    patched = {"kind": "Scale", "metadata": {"name": name}, "spec": {"replicas": replicas},
                               "status": {"replicas": replicas}}  # fmt: skip
                return self._answer(200, patched)
            if method == "DELETE":
                c.delete(group, resource, name)
                return self._answer(200, {"kind": "Status", "status": "Success"})
        except ApiException as exc:
            return self._answer(
                exc.status, {"kind": "Status", "status": "Failure", "code": exc.status, "message": exc.reason}
            )
        self._answer(405, {"kind": "Status", "status": "Failure", "message": f"{method} {self.path}"})

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")


@contextmanager
def serving(cluster: FakeCluster) -> Iterator[tuple[str, list[str]]]:
    """(base URL, the Content-Types of the PATCH requests received) while the server runs."""
    content_types: list[str] = []
    handler = type("Handler", (_Handler,), {"cluster": cluster, "content_types": content_types})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", content_types
    finally:
        server.shutdown()
        server.server_close()
