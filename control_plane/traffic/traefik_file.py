"""TrafficRouter over Traefik's file provider: the dynamic file is the state, rewritten whole and atomically."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from control_plane.traffic.base import (
    ROLES,
    Backend,
    InvalidBackends,
    Mirror,
    TrafficStateUnreadable,
    check_assignment,
    merge_backends,
    validate_weights,
)
from control_plane.traffic.user_assignment import (
    DEFAULT_SEED,
    STICKY_COOKIE,
    USER_HEADER,
    pair_plugin_config,
    plugin_config,
)

DYNAMIC_FILENAME = "recsys.yml"

# Names in the dynamic config; Prometheus labels (router, service) and dashboards use them.
GATEWAY_ROUTER = "gateway"
USERS_ROUTER = "gateway-users"  # the gateway's requests that name a user: through the userassign plugin
FEEDBACK_ROUTER = "feedback"
SPLIT_SERVICE = "recsys-split"
# During a rollout's shadow phase the gateway's router points at this mirroring service: the weighted
# split answers, and a share of its requests is copied to the shadow version (answers discarded).
MIRROR_SERVICE = "recsys-mirror"
# The shadow version is reached under this path prefix (`preservePath`), so its Bento logs the copies
# with route = shadow (bentos/http.py); the gateway routes only /predict and /recommend, so no client
# can reach that path through it.
SHADOW_PATH_PREFIX = "/shadow"
CONTROL_PLANE_SERVICE = "control-plane"
ROUTE_WEIGHTED_MIDDLEWARE = "recsys-route-weighted"
ROUTE_OVERRIDE_MIDDLEWARE = "recsys-route-override"
RETRY_MIDDLEWARE = "recsys-retry"
BODY_LIMIT_MIDDLEWARE = "recsys-body-limit"
LABEL_RATE_MIDDLEWARE = "recsys-label-rate"
LENGTH_REQUIRED_ROUTER = "length-required"
LENGTH_REQUIRED_MIDDLEWARE = "recsys-length-required"
USER_ASSIGN_MIDDLEWARE = "recsys-user-assign"
# During a shadow phase (with the plugin loaded) the gateway's routers give each request a pair key
# before the mirror copies it, so its two answers can be joined (control_plane/analysis/paired.py).
PAIR_KEY_MIDDLEWARE = "recsys-pair-key"
ROUTE_HEADER = "X-Recsys-Route"
VERSION_HEADER = "X-Model-Version"
ROLE_HEADER = "X-Model-Role"

PREDICTION_PATHS_RULE = "Path(`/predict`) || Path(`/recommend`)"

# A tester's header beats the weighted split; a version header beats a role header.
GATEWAY_PRIORITY = 100
USERS_PRIORITY = 150
ROLE_OVERRIDE_PRIORITY = 200
VERSION_OVERRIDE_PRIORITY = 300
LENGTH_REQUIRED_PRIORITY = 1000

# A POST to the gateway's paths whose body has no Content-Length (a chunked one) is refused with 411
# "Length Required" before any other router sees it. Traefik answers a chunked body whose chunk-size
# line is malformed with a 500 from its buffering middleware (and its fast proxy does too), and every
# client this API has sends a Content-Length for a JSON body. An allow-list that allows no address is
# Traefik's one way to answer a request itself with a chosen status (its `rejectStatusCode`); the
# router's rule sees Content-Length, which Go removes from a chunked request's headers.
LENGTH_REQUIRED_RULE = (
    "Method(`POST`) && (Path(`/predict`) || Path(`/recommend`) || PathPrefix(`/feedback`))"
    " && !HeaderRegexp(`Content-Length`, `^[0-9]+$`)"
)

_HEADER_COMMENT = (
    "# Written by control_plane.traffic.traefik_file: the whole file is replaced atomically on every change.\n"
    "# Do not edit by hand while the control plane runs; change weights through it instead.\n"
)
_SERVICE_RE = re.compile(r"^recsys-v(\d+)$")
_SHADOW_RE = re.compile(r"^recsys-shadow-v(\d+)$")


def version_service(version: int) -> str:
    return f"recsys-v{version}"


def shadow_service(version: int) -> str:
    return f"recsys-shadow-v{version}"


def version_router(version: int) -> str:
    return f"override-version-{version}"


def role_router(role: str) -> str:
    return f"override-role-{role}"


@dataclass(frozen=True)
class GatewayOptions:
    """What the dynamic config holds besides the state: entry point, limits, health checks, extras."""

    entrypoint: str = "web"
    control_plane_url: str | None = None
    # Versions deployed without a role (e.g. a previous baseline kept warm), reachable by header only.
    extra_versions: Mapping[int, str] = field(default_factory=dict)
    max_body_bytes: int = 1_000_000
    retry_attempts: int = 3
    retry_initial_interval: str = "10ms"
    health_path: str = "/readyz"
    # Lenient enough that a Bento slowed by a loaded machine is not taken out (which shifts its share to
    # the others and looks like a sample-ratio mismatch); retries still cover a Bento that is really gone.
    health_interval: str = "2s"
    health_timeout: str = "2s"
    # /feedback per client (source address): requests a second on average, and a burst (docs/labels.md).
    label_rate_per_s: int = 300
    label_burst: int = 600
    # Sticky, monotone assignment of users (X-User-Id) by the `userassign` local plugin, and Traefik's
    # sticky cookie for browsers; Traefik must be started with the plugin (static_config(user_plugin=True)).
    user_assignment: bool = False
    user_seed: str = DEFAULT_SEED


def render_dynamic_config(
    backends: Mapping[str, Backend],
    weights: Mapping[str, int],
    options: GatewayOptions | None = None,
    mirror: Mirror | None = None,
) -> dict[str, Any]:
    """The dynamic configuration (as a dict) for these role assignments, weights and shadow mirror."""
    opts = options or GatewayOptions()
    routers: dict[str, Any] = {}
    services: dict[str, Any] = {}
    middlewares: dict[str, Any] = {
        ROUTE_WEIGHTED_MIDDLEWARE: {"headers": {"customRequestHeaders": {ROUTE_HEADER: "weighted"}}},
        ROUTE_OVERRIDE_MIDDLEWARE: {"headers": {"customRequestHeaders": {ROUTE_HEADER: "override"}}},
        # Retries only happen when a backend could not be reached, so a dead one costs one hop.
        RETRY_MIDDLEWARE: {
            "retry": {"attempts": opts.retry_attempts, "initialInterval": opts.retry_initial_interval}
        },
        # Oversized bodies get 413 from Traefik; the body is buffered, so a retry can resend it.
        BODY_LIMIT_MIDDLEWARE: {"buffering": {"maxRequestBodyBytes": opts.max_body_bytes}},
        # Per source address (the client's, as Traefik sees the connection): over the rate, 429.
        LABEL_RATE_MIDDLEWARE: {
            "rateLimit": {"average": opts.label_rate_per_s, "period": "1s", "burst": opts.label_burst}
        },
        LENGTH_REQUIRED_MIDDLEWARE: {"ipAllowList": {"sourceRange": ["0.0.0.0/32"], "rejectStatusCode": 411}},
    }
    routers[LENGTH_REQUIRED_ROUTER] = {
        "entryPoints": [opts.entrypoint],
        "rule": LENGTH_REQUIRED_RULE,
        "priority": LENGTH_REQUIRED_PRIORITY,
        "middlewares": [LENGTH_REQUIRED_MIDDLEWARE],
        "service": "noop@internal",  # never reached: the middleware answers every request
    }

    urls = {version: url for version, url in opts.extra_versions.items()}
    urls.update({b.version: b.url for b in backends.values()})
    for version in sorted(urls):
        services[version_service(version)] = {
            "loadBalancer": {
                "servers": [{"url": urls[version]}],
                "passHostHeader": True,
                "healthCheck": {
                    "path": opts.health_path,
                    "interval": opts.health_interval,
                    "timeout": opts.health_timeout,
                },
            }
        }
        routers[version_router(version)] = {
            "entryPoints": [opts.entrypoint],
            "rule": f"({PREDICTION_PATHS_RULE}) && Header(`{VERSION_HEADER}`, `{version}`)",
            "priority": VERSION_OVERRIDE_PRIORITY,
            "middlewares": [ROUTE_OVERRIDE_MIDDLEWARE, BODY_LIMIT_MIDDLEWARE],
            "service": version_service(version),
        }

    if backends:
        services[SPLIT_SERVICE] = {
            "weighted": {
                "services": [
                    {"name": version_service(backends[role].version), "weight": weights.get(role, 0)}
                    for role in ROLES
                    if role in backends
                ],
                # Follow the children's health checks: a dead version's share goes to the live ones.
                "healthCheck": {},
            }
        }
        gateway_service = SPLIT_SERVICE
        if mirror is not None and mirror.percent > 0 and mirror.version in urls:
            services[shadow_service(mirror.version)] = {
                "loadBalancer": {
                    "servers": [{"url": urls[mirror.version] + SHADOW_PATH_PREFIX, "preservePath": True}],
                    "passHostHeader": True,
                }
            }
            services[MIRROR_SERVICE] = {
                "mirroring": {
                    "service": SPLIT_SERVICE,
                    "mirrorBody": True,
                    "maxBodySize": opts.max_body_bytes,
                    "mirrors": [{"name": shadow_service(mirror.version), "percent": mirror.percent}],
                }
            }
            gateway_service = MIRROR_SERVICE
        # The pair key costs a plugin call per request: only while a mirror runs, and only where the
        # plugin is loaded (the same `userassign` plugin, in its pair-key mode).
        pair = [PAIR_KEY_MIDDLEWARE] if gateway_service == MIRROR_SERVICE and opts.user_assignment else []
        if pair:
            middlewares[PAIR_KEY_MIDDLEWARE] = {"plugin": pair_plugin_config()}
        if opts.user_assignment:
            # The plugin names the user's child in this cookie; a browser without a user id is given
            # one by the weighted service and keeps its version while the weights allow it.
            services[SPLIT_SERVICE]["weighted"]["sticky"] = {
                "cookie": {"name": STICKY_COOKIE, "httpOnly": True, "sameSite": "lax"}
            }
            # Rendered from the same weights as the split, in the same file: one reload changes both.
            middlewares[USER_ASSIGN_MIDDLEWARE] = {
                "plugin": plugin_config(
                    {role: version_service(b.version) for role, b in backends.items()},
                    weights,
                    opts.user_seed,
                )
            }
            # Only requests that name a user pass through the plugin (Yaegi interprets it, so a call
            # costs); the others take the plain gateway router below, to the same weighted service.
            routers[USERS_ROUTER] = {
                "entryPoints": [opts.entrypoint],
                "rule": f"({PREDICTION_PATHS_RULE}) && HeaderRegexp(`{USER_HEADER}`, `.`)",
                "priority": USERS_PRIORITY,
                "middlewares": [
                    ROUTE_WEIGHTED_MIDDLEWARE,
                    BODY_LIMIT_MIDDLEWARE,
                    USER_ASSIGN_MIDDLEWARE,
                    *pair,
                    RETRY_MIDDLEWARE,
                ],
                "service": gateway_service,  # the shadow phase's mirror too
            }
        routers[GATEWAY_ROUTER] = {
            "entryPoints": [opts.entrypoint],
            "rule": PREDICTION_PATHS_RULE,
            "priority": GATEWAY_PRIORITY,
            "middlewares": [ROUTE_WEIGHTED_MIDDLEWARE, BODY_LIMIT_MIDDLEWARE, *pair, RETRY_MIDDLEWARE],
            "service": gateway_service,
        }
        for role in ROLES:
            if role in backends:
                routers[role_router(role)] = {
                    "entryPoints": [opts.entrypoint],
                    "rule": f"({PREDICTION_PATHS_RULE}) && Header(`{ROLE_HEADER}`, `{role}`)",
                    "priority": ROLE_OVERRIDE_PRIORITY,
                    "middlewares": [ROUTE_OVERRIDE_MIDDLEWARE, BODY_LIMIT_MIDDLEWARE],
                    "service": version_service(backends[role].version),
                }

    if opts.control_plane_url:
        services[CONTROL_PLANE_SERVICE] = {
            "loadBalancer": {"servers": [{"url": opts.control_plane_url}], "passHostHeader": True}
        }
        routers[FEEDBACK_ROUTER] = {
            "entryPoints": [opts.entrypoint],
            "rule": "PathPrefix(`/feedback`)",
            # The same label again changes nothing, so resending one that may not have arrived is safe.
            "middlewares": [LABEL_RATE_MIDDLEWARE, BODY_LIMIT_MIDDLEWARE, RETRY_MIDDLEWARE],
            "service": CONTROL_PLANE_SERVICE,
        }

    return {"http": {"routers": routers, "services": services, "middlewares": middlewares}}


def dump_dynamic_config(config: Mapping[str, Any]) -> str:
    """YAML text of a rendered config, with the do-not-edit header."""
    return _HEADER_COMMENT + yaml.safe_dump(
        dict(config), sort_keys=False, default_flow_style=False, width=1000
    )


def parse_dynamic_config(config: Mapping[str, Any] | None) -> tuple[dict[str, Backend], dict[str, int]]:
    """Read role assignments and weights back out of a rendered config."""
    weights = dict.fromkeys(ROLES, 0)
    if not config:
        return {}, weights
    http = config.get("http") or {}
    routers, services = http.get("routers") or {}, http.get("services") or {}
    split = {
        entry["name"]: int(entry["weight"])
        for entry in ((services.get(SPLIT_SERVICE) or {}).get("weighted") or {}).get("services") or []
    }
    backends: dict[str, Backend] = {}
    for role in ROLES:
        router = routers.get(role_router(role))
        if not router:
            continue
        name = router["service"]
        match = _SERVICE_RE.match(name)
        if not match:
            raise TrafficStateUnreadable(
                f"router {role_router(role)!r} points at unexpected service {name!r}"
            )
        url = services[name]["loadBalancer"]["servers"][0]["url"]
        backends[role] = Backend(version=int(match.group(1)), url=url)
        weights[role] = split.get(name, 0)
    return backends, weights


def parse_mirror(config: Mapping[str, Any] | None) -> Mirror | None:
    """The shadow mirror a rendered config holds, if any."""
    services = ((config or {}).get("http") or {}).get("services") or {}
    mirrors = ((services.get(MIRROR_SERVICE) or {}).get("mirroring") or {}).get("mirrors") or []
    if not mirrors:
        return None
    match = _SHADOW_RE.match(str(mirrors[0].get("name", "")))
    if not match:
        raise TrafficStateUnreadable(f"mirror {mirrors[0]!r} does not name a shadow service")
    return Mirror(version=int(match.group(1)), percent=int(mirrors[0].get("percent", 0)))


class TraefikFileRouter:
    """Keeps role assignments and weights in `<dynamic_dir>/recsys.yml`, which Traefik watches."""

    def __init__(
        self,
        dynamic_dir: Path | str,
        *,
        control_plane_url: str | None = None,
        extra_versions: Mapping[int, str] | None = None,
        max_body_bytes: int = 1_000_000,
        entrypoint: str = "web",
        tmp_dir: Path | str | None = None,
        options: GatewayOptions | None = None,
    ) -> None:
        self.dynamic_dir = Path(dynamic_dir)
        # Outside the watched directory, or Traefik would load the half-written temp file as config;
        # beside it, so that os.replace stays on one filesystem.
        self.tmp_dir = Path(tmp_dir) if tmp_dir else self.dynamic_dir.parent / ".tmp"
        self.options = options or GatewayOptions(
            entrypoint=entrypoint,
            control_plane_url=control_plane_url,
            extra_versions=dict(extra_versions or {}),
            max_body_bytes=max_body_bytes,
        )

    @property
    def path(self) -> Path:
        return self.dynamic_dir / DYNAMIC_FILENAME

    def get_weights(self) -> dict[str, int]:
        return self._read()[1]

    def get_backends(self) -> dict[str, Backend]:
        return self._read()[0]

    def get_mirror(self) -> Mirror | None:
        return self._read()[2]

    def set_weights(self, weights: Mapping[str, int]) -> None:
        clean = validate_weights(weights)
        with self._locked():
            backends, _, mirror = self._read()
            self._write(backends, clean, mirror)

    def set_backends(self, backends: Mapping[str, Backend | None]) -> None:
        with self._locked():
            current, weights, mirror = self._read()
            self._write(merge_backends(current, backends), weights, mirror)

    def apply(self, backends: Mapping[str, Backend | None], weights: Mapping[str, int]) -> None:
        clean = validate_weights(weights)
        with self._locked():
            current, _, mirror = self._read()
            self._write(merge_backends(current, backends), clean, mirror)

    def set_mirror(self, mirror: Mirror | None) -> None:
        """Copy `percent` of the weighted requests to a deployed version (answers discarded), or stop."""
        with self._locked():
            backends, weights, _ = self._read()
            if mirror is not None and mirror.version not in {b.version for b in backends.values()}:
                raise InvalidBackends(f"version {mirror.version} holds no role: it cannot be mirrored to")
            self._write(backends, weights, mirror)

    def release(self, version: int) -> None:
        """Stop mirroring to `version` if the mirror names it."""
        with self._locked():
            backends, weights, mirror = self._read()
            if mirror is not None and mirror.version == version:
                self._write(backends, weights, None)

    def rewrite(self) -> None:
        """Write the file again from its own state, e.g. after the options (extra versions) changed."""
        with self._locked():
            self._write(*self._read())

    def _read(self) -> tuple[dict[str, Backend], dict[str, int], Mirror | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return (*parse_dynamic_config(None), None)
        try:
            config = yaml.safe_load(text)
            return (*parse_dynamic_config(config), parse_mirror(config))
        except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise TrafficStateUnreadable(f"cannot read routing state from {self.path}: {exc}") from exc

    def _write(self, backends: dict[str, Backend], weights: dict[str, int], mirror: Mirror | None) -> None:
        check_assignment(weights, backends)
        if mirror is not None and mirror.version not in {b.version for b in backends.values()}:
            mirror = None  # its version lost its role (a rollback retires it): nothing left to mirror to
        text = dump_dynamic_config(render_dynamic_config(backends, weights, self.options, mirror))
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text() == text:
                return  # unchanged: spare Traefik a reload
        atomic_write(self.path, text, self.tmp_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write across processes (the web app and the worker both write)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.tmp_dir / f"{DYNAMIC_FILENAME}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write(path: Path, text: str, tmp_dir: Path) -> None:
    """Write `text` to a temp file in `tmp_dir`, fsync it, rename it over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; Traefik may run as another user
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
