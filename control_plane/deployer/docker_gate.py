"""The Docker API gate: the only holder of the Docker socket; it lets through what the DockerDeployer needs.

Access to the Docker socket is root on the host (a container created with `Binds: ["/:/host"]` or
`Privileged`), so the control plane and the worker never get it. They talk to this gate over a compose
network of its own, and the gate forwards a request to the socket only when `check` allows it:

  GET  /_ping, /version                      engine liveness and version
  GET  /images/<repo>:v<N>/json              whether a Bento image exists (its labels)
  DELETE /images/<repo>:v<N>                 a retired version's image; no option (so never forced)
  POST /build?t=<repo>:v<N>                  only the project's Bento Dockerfile (byte for byte), whose
                                             single build argument is the app image; it has no RUN step;
                                             the gate stamps the label recsys.project=<p> on the image
  POST /containers/create?name=<p>-bento-v<N>
                                             image <repo>:v<N> only; on the project network only, no host
                                             ports, mounts, devices, capabilities or privileges (the
                                             fields allowed are listed below); the gate stamps the
                                             compose labels itself, so `docker-compose down` removes it
  GET  /containers/<p>-bento-v<N>/json, /logs; POST .../start, .../stop; DELETE it
  GET  /containers/json                      with its label filter forced to this project's Bentos

Everything else is refused with 403 and a message naming the rule. `check` is a pure function of the
request and the gate's configuration; the server around it only forwards.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import tarfile
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from control_plane.deployer.docker_api import API_VERSION, connection

log = logging.getLogger("recsys.docker_gate")

BENTO_DOCKERFILE = Path(__file__).with_name("bento.Dockerfile")
BENTO_LABEL = "recsys.bento"
PROJECT_LABEL = "recsys.project"  # on a Bento image: the compose project that built it (make compose-down)
# The one mount a Bento may have: the project's spill volume (declared in docker-compose.yml, so
# `docker-compose down --volumes` removes it), where it keeps the rows the database did not take until it
# replays them, so that a crashed Bento's replacement finds them.
SPILL_TARGET = "/var/spool/recsys"
MAX_BODY_BYTES = 1 << 30  # a Bento's build context: its model and sources, a few MB here
_VERSION_PREFIX = re.compile(r"^/v\d+\.\d+(/.*)$")

# Fields of a container-create body the deployer may set; anything else (Binds, Mounts, Privileged,
# PortBindings, CapAdd, Devices, PidMode, User, Entrypoint, Cmd ...) is refused.
CREATE_FIELDS = frozenset(
    {"Image", "Env", "Labels", "ExposedPorts", "Healthcheck", "StopTimeout", "HostConfig"}
)
HOST_CONFIG_FIELDS = frozenset(
    {
        "NetworkMode",
        "RestartPolicy",
        "ReadonlyRootfs",
        "Tmpfs",
        "Memory",
        "NanoCpus",
        "CapDrop",
        "SecurityOpt",
        "Init",
        "Mounts",
    }
)
SECURITY_OPTS = frozenset({"no-new-privileges", "no-new-privileges:true"})


def spill_volume(project: str) -> str:
    """The compose volume `bento-spill` of `project`, as docker-compose names it."""
    return f"{project}_bento-spill"


@dataclass(frozen=True)
class GateConfig:
    """What the gate allows: one compose project's Bentos, on its network, from one image repository."""

    project: str
    network: str
    app_image: str
    image_repo: str = "recsys-bento"
    dockerfile: bytes = b""

    @property
    def spill_volume(self) -> str:
        return spill_volume(self.project)

    def container_name(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.project)}-bento-v(\d+)$")

    def image_name(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.image_repo)}:v(\d+)$")


@dataclass(frozen=True)
class GateRequest:
    method: str
    path: str  # without the API version prefix
    query: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""
    path: str = ""  # what to forward (query rewritten where the gate forces one)
    body: bytes | None = None  # the body to forward, when the gate rewrote it


def _deny(reason: str) -> Verdict:
    return Verdict(False, reason)


def split_target(target: str) -> GateRequest:
    """`/v1.41/containers/x/json?all=1` -> path `/containers/x/json`, query {'all': '1'} (method added later)."""
    parts = urllib.parse.urlsplit(target)
    path = parts.path
    m = _VERSION_PREFIX.match(path)
    if m:
        path = m.group(1)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return GateRequest("", path, query)


def check(req: GateRequest, cfg: GateConfig) -> Verdict:
    """Whether the gate forwards `req`, and what exactly it forwards."""
    method, path = req.method, req.path
    plain = _with_query(path, req.query)
    if method in ("GET", "HEAD") and path in ("/_ping", "/version"):
        return Verdict(True, path=plain)
    if method == "GET" and path.startswith("/images/") and path.endswith("/json"):
        image = urllib.parse.unquote(path[len("/images/") : -len("/json")])
        if cfg.image_name().match(image):
            return Verdict(True, path=plain)
        return _deny(f"image {image!r} is not a Bento image {cfg.image_repo}:v<N>")
    if method == "DELETE" and path.startswith("/images/"):
        image = urllib.parse.unquote(path[len("/images/") :])
        if not cfg.image_name().fullmatch(image):
            return _deny(f"image {image!r} is not a Bento image {cfg.image_repo}:v<N>")
        if req.query:
            return _deny(f"removing an image takes no option ({sorted(req.query)})")
        return Verdict(True, path=path)
    if method == "POST" and path == "/build":
        return _check_build(req, cfg)
    if method == "POST" and path == "/containers/create":
        return _check_create(req, cfg)
    if method == "GET" and path == "/containers/json":
        filters = {"label": [f"com.docker.compose.project={cfg.project}", BENTO_LABEL]}
        query = {"all": req.query.get("all", "0"), "filters": json.dumps(filters)}
        return Verdict(True, path=_with_query(path, query))
    m = re.match(r"^/containers/([^/]+)(/[a-z]+)?$", path)
    if m:
        name, action = urllib.parse.unquote(m.group(1)), m.group(2) or ""
        if not cfg.container_name().match(name):
            return _deny(f"container {name!r} is not one of this project's Bentos ({cfg.project}-bento-v<N>)")
        allowed = {
            ("GET", "/json"),
            ("GET", "/logs"),
            ("POST", "/start"),
            ("POST", "/stop"),
            ("DELETE", ""),
        }
        if (method, action) in allowed:
            if action == "/logs" and req.query.get("follow") not in (None, "", "0", "false"):
                return _deny("following a container's log is not allowed")
            return Verdict(True, path=plain)
        return _deny(f"{method} /containers/<name>{action} is not allowed")
    return _deny(f"{method} {path} is not one of the calls the gate allows")


def _check_build(req: GateRequest, cfg: GateConfig) -> Verdict:
    q = req.query
    tag = q.get("t", "")
    if not cfg.image_name().match(tag):
        return _deny(f"a build must be tagged {cfg.image_repo}:v<N>, not {tag!r}")
    for name in set(q) - {"t", "rm", "forcerm", "buildargs", "labels", "q"}:
        return _deny(f"build option {name!r} is not allowed")
    try:
        buildargs = json.loads(q.get("buildargs") or "{}")
        labels = json.loads(q.get("labels") or "{}")
    except ValueError:
        return _deny("buildargs and labels must be JSON objects")
    if buildargs != {"APP_IMAGE": cfg.app_image}:
        return _deny(f"the only build argument is APP_IMAGE={cfg.app_image}")
    if not isinstance(labels, dict) or any(not str(k).startswith("recsys.") for k in labels):
        return _deny("build labels must be named recsys.*")
    dockerfile = _dockerfile_of(req.body)
    if dockerfile is None:
        return _deny("the build context must be an uncompressed tar with a Dockerfile at its root")
    if dockerfile != cfg.dockerfile:
        return _deny("the build context's Dockerfile is not the project's bento.Dockerfile")
    stamped = {**labels, PROJECT_LABEL: cfg.project}
    return Verdict(True, path=_with_query("/build", {**q, "labels": json.dumps(stamped)}))


def _dockerfile_of(body: bytes) -> bytes | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
            member = tar.getmember("Dockerfile")
            handle = tar.extractfile(member)
            return handle.read() if handle else None
    except (tarfile.TarError, KeyError):
        return None


def _check_create(req: GateRequest, cfg: GateConfig) -> Verdict:
    name = req.query.get("name", "")
    m = cfg.container_name().match(name)
    if not m or set(req.query) - {"name"}:
        return _deny(f"a container must be named {cfg.project}-bento-v<N>, with no other option")
    try:
        spec = json.loads(req.body or b"{}")
    except ValueError:
        return _deny("the container spec is not JSON")
    if not isinstance(spec, dict):
        return _deny("the container spec is not a JSON object")
    extra = set(spec) - CREATE_FIELDS
    if extra:
        return _deny(f"container fields {sorted(extra)} are not allowed")
    version = m.group(1)
    if spec.get("Image") != f"{cfg.image_repo}:v{version}":
        return _deny(f"container {name} must run image {cfg.image_repo}:v{version}")
    host = spec.get("HostConfig") or {}
    extra = set(host) - HOST_CONFIG_FIELDS
    if extra:
        return _deny(f"HostConfig fields {sorted(extra)} are not allowed")
    if host.get("NetworkMode") != cfg.network:
        return _deny(f"a Bento joins network {cfg.network} and no other")
    if set(host.get("SecurityOpt") or ()) - SECURITY_OPTS:
        return _deny("the only security option allowed is no-new-privileges")
    if any(not str(path).startswith("/tmp") for path in (host.get("Tmpfs") or {})):
        return _deny("tmpfs mounts are allowed under /tmp only")
    spill = {"Type": "volume", "Source": cfg.spill_volume, "Target": SPILL_TARGET}
    mounts = host.get("Mounts") or []
    if not isinstance(mounts, list) or any(
        not isinstance(m, dict) or {k: v for k, v in m.items() if k != "ReadOnly"} != spill for m in mounts
    ):
        return _deny(f"the only mount allowed is volume {cfg.spill_volume} at {SPILL_TARGET}")
    labels = {
        str(k): str(v) for k, v in (spec.get("Labels") or {}).items() if not str(k).startswith("com.docker")
    }
    labels.update(
        {
            "com.docker.compose.project": cfg.project,
            "com.docker.compose.service": f"bento-v{version}",
            "com.docker.compose.oneoff": "False",
            BENTO_LABEL: version,
        }
    )
    forwarded = {**spec, "Labels": labels, "HostConfig": host}
    # The network attachment (with its alias) is the gate's, on the one network allowed.
    forwarded["NetworkingConfig"] = {"EndpointsConfig": {cfg.network: {"Aliases": [f"bento-v{version}"]}}}
    return Verdict(
        True, path=_with_query("/containers/create", {"name": name}), body=json.dumps(forwarded).encode()
    )


def _with_query(path: str, query: dict[str, str]) -> str:
    return path + (f"?{urllib.parse.urlencode(query)}" if query else "")


class _Handler(BaseHTTPRequestHandler):
    config: GateConfig
    socket_path: str

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES or self.headers.get("Transfer-Encoding"):
            self._refuse(413, "a request body needs a Content-Length of at most 1 GiB")
            return
        body = self.rfile.read(length) if length else b""
        req = split_target(self.path)
        req = GateRequest(self.command, req.path, req.query, body)
        verdict = check(req, self.config)
        if not verdict.allowed:
            log.warning("refused %s %s: %s", self.command, req.path, verdict.reason)
            self._refuse(403, verdict.reason)
            return
        forward = verdict.body if verdict.body is not None else body
        conn = connection(f"unix://{self.socket_path}", timeout_s=900)
        try:
            headers = (
                {"Content-Type": self.headers.get("Content-Type", "application/json")} if forward else {}
            )
            conn.request(self.command, f"/{API_VERSION}{verdict.path}", body=forward or None, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for key in ("Content-Type", "Api-Version", "Docker-Experimental", "Ostype"):
                if resp.getheader(key):
                    self.send_header(key, resp.getheader(key))
            self.end_headers()
            while chunk := resp.read(65536):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the caller gave up (a health check's timeout)
            log.info("%s %s: the caller hung up before the answer", self.command, req.path)
        finally:
            conn.close()

    def _refuse(self, status: int, reason: str) -> None:
        data = json.dumps({"message": f"refused by the recsys Docker gate: {reason}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = _handle

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if "/_ping" not in self.path:  # the health check's, every few seconds
            log.info("%s %s", self.address_string(), format % args)


def serve(host: str, port: int, socket_path: str, config: GateConfig) -> None:
    handler = type("Handler", (_Handler,), {"config": config, "socket_path": socket_path})
    server = ThreadingHTTPServer((host, port), handler)
    log.info("docker gate on %s:%d for project %s, network %s", host, port, config.project, config.network)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m control_plane.deployer.docker_gate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--listen", default="0.0.0.0:2375", help="host:port to serve on (a network of its own)")
    p.add_argument("--socket", default="/var/run/docker.sock")
    p.add_argument("--project", required=True, help="compose project whose Bentos may be managed")
    p.add_argument("--network", required=True, help="the one network a Bento may join")
    p.add_argument("--app-image", required=True, help="the image every Bento image is built FROM")
    p.add_argument("--image-repo", default="recsys-bento")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = args.listen.rpartition(":")
    config = GateConfig(
        project=args.project,
        network=args.network,
        app_image=args.app_image,
        image_repo=args.image_repo,
        dockerfile=BENTO_DOCKERFILE.read_bytes(),
    )
    serve(host or "0.0.0.0", int(port), args.socket, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
