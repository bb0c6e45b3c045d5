"""Traefik's static configuration: entry points, the file provider, metrics, logs."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import yaml

from control_plane.settings import TRAEFIK_ACCESS_LOG_MODES
from control_plane.traffic.user_assignment import static_plugins

GATEWAY_ENTRYPOINT = "web"
# The admin entry point: /ping and /metrics (read-only, for health checks and Prometheus), and the API
# and dashboard through a router that asks for the operator's credentials (`admin_dynamic_config`);
# never the gateway's port. `api.insecure` would serve the API there to anyone who reaches the port.
ADMIN_ENTRYPOINT = "traefik"
ADMIN_FILENAME = "admin.yml"  # in the dynamic directory, beside the router's recsys.yml
ADMIN_ROUTER = "traefik-api"
ADMIN_AUTH_MIDDLEWARE = "traefik-api-auth"
ADMIN_USER = "operator"

# Latency buckets in seconds, from 5 ms: model calls take a few ms, so Traefik's defaults (0.1 s up) are too coarse.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The access log's fields. Traefik encodes each kept field of every request as JSON; keeping these
# instead of all of them (StartLocal, ServiceAddr and others repeat one another) took its CPU per
# request from 217 to 206 us at 8 connections (docs/performance.md).
ACCESS_LOG_FIELDS = (
    "StartUTC",
    "Duration",
    "OriginDuration",
    "RouterName",
    "ServiceName",
    "ServiceURL",
    "ClientHost",
    "RequestMethod",
    "RequestPath",
    "RequestContentSize",
    "OriginStatus",
    "DownstreamStatus",
    "DownstreamContentSize",
    "RetryAttempts",
)


# RECSYS_TRAEFIK_ACCESS_LOG: which requests get a line in the gateway's access log.
#   problems  errors (4xx and 5xx), retried requests and requests slower than SLOW_REQUEST; a served
#             prediction is in the `predictions` table anyway, with the same request id, version,
#             role, route, status and latency
#   all       every request (to follow any request id through the gateway)
#   off       none
# Formatting a JSON line for every request was the largest single part of Traefik's CPU (about 15 %
# in a Go CPU profile at /predict c8); measured side by side with the fast proxy, `problems` took
# Traefik's CPU from 181 to 147 us a request and served 11 % more requests/s (docs/performance.md).
SLOW_REQUEST = "100ms"

# How long Traefik waits on a client (entryPoints.<name>.transport.respondingTimeouts; Traefik 3's
# defaults are a 60 s read, no write limit and a 180 s idle keep-alive). `readTimeout` bounds the
# whole request, headers and body: Traefik reads a body before the Bento sees it, so without it a
# stalled body or a header trickled a byte at a time held a connection for a minute with no answer.
# Past it Traefik closes the connection (measured in docs/what-it-survives.md). `writeTimeout` runs
# from the end of the headers to the end of the response, so it must cover the slowest backend
# answer: a Bento's 10 s and a /feedback spilled to disk are far under it.
WRITE_TIMEOUT = "30s"
IDLE_TIMEOUT = "60s"
# How long Traefik keeps an idle connection to a backend. It must be shorter than the backends' own
# keep-alive (uvicorn under `bentoml serve`: 5 s), or Traefik sends a request on a connection the Bento
# is closing at that moment and answers 502 without a retry: seen once in a hostile run
# (docs/hostile-input.md). The fast proxy's pool honours it (serversTransport.forwardingTimeouts).
BACKEND_IDLE_TIMEOUT = "3s"


def client_timeouts(read_timeout_s: float) -> dict[str, Any]:
    """An entry point's `transport` with its responding timeouts (a fresh dict: YAML gets no anchors)."""
    return {
        "transport": {
            "respondingTimeouts": {
                "readTimeout": f"{read_timeout_s:g}s",
                "writeTimeout": WRITE_TIMEOUT,
                "idleTimeout": IDLE_TIMEOUT,
            }
        }
    }


def access_log(mode: str, path: Path | str | None = None) -> dict[str, Any] | None:
    """Traefik's `accessLog` for `mode` (its filters are OR-ed), written to `path` (stdout if None);
    None when the mode is off."""
    if mode not in TRAEFIK_ACCESS_LOG_MODES:
        raise ValueError(f"access log mode {mode!r}: expected one of {', '.join(TRAEFIK_ACCESS_LOG_MODES)}")
    if mode == "off":
        return None
    config: dict[str, Any] = {
        "format": "json",
        "fields": {
            "defaultMode": "drop",
            "names": dict.fromkeys(ACCESS_LOG_FIELDS, "keep"),
            "headers": {
                "defaultMode": "drop",
                "names": {
                    "X-Recsys-Route": "keep",
                    "X-Model-Version": "keep",
                    "X-Model-Role": "keep",
                    "X-Request-Id": "keep",
                },
            },
        },
    }
    if mode == "problems":
        config["filters"] = {"statusCodes": ["400-599"], "retryAttempts": True, "minDuration": SLOW_REQUEST}
    if path:
        config["filePath"] = str(path)
    return config


def static_config(
    *,
    dynamic_dir: Path | str,
    gateway_host: str = "127.0.0.1",
    gateway_port: int = 8080,
    api_host: str = "127.0.0.1",
    api_port: int = 8081,
    access_log_path: Path | str | None = None,
    log_level: str = "INFO",
    providers_throttle: str = "500ms",
    fast_proxy: bool = True,
    access_log_mode: str = "problems",
    read_timeout_s: float = 5.0,
    user_plugin: bool = False,
) -> dict[str, Any]:
    """The static configuration as a dict; an empty host binds every interface (as in a container).

    `fast_proxy`: Traefik's fasthttp-based proxy to the Bentos (`experimental.fastProxy`, HTTP/1.1
    backends) instead of Go's `httputil.ReverseProxy`. Measured side by side over the same three
    Bentos: Traefik's CPU per request 235 -> 201 us at /predict c8, 374 -> 306 at one connection and
    420 -> 334 at /recommend, and 11-18 % more requests/s (docs/performance.md). Middlewares, the
    access log, Prometheus metrics, retries and health checks work as before; what it lacks (HTTP/2
    to backends, OpenTelemetry tracing and semconv metrics) this stack does not use.
    `RECSYS_TRAEFIK_FAST_PROXY=off` goes back to Go's proxy.

    `access_log_mode`: problems, all or off (above).
    `read_timeout_s`: how long a client has to send a whole request (RECSYS_GATEWAY_READ_TIMEOUT_S).
    `user_plugin`: load the `userassign` local plugin (sticky assignment of users,
    control_plane/traffic/user_assignment.py); Traefik must then run in a directory holding
    `plugins-local/` (`user_assignment.install_plugin`). RECSYS_USER_ASSIGNMENT=off leaves it out.
    """
    log = access_log(access_log_mode, access_log_path)
    config: dict[str, Any] = {
        "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
        "log": {"level": log_level},
        "entryPoints": {
            GATEWAY_ENTRYPOINT: {
                "address": f"{gateway_host}:{gateway_port}",
                **client_timeouts(read_timeout_s),
            },
            ADMIN_ENTRYPOINT: {"address": f"{api_host}:{api_port}", **client_timeouts(read_timeout_s)},
        },
        # A rewrite is applied at once; a burst of rewrites is folded into one reload per interval.
        "providers": {
            "providersThrottleDuration": providers_throttle,
            "file": {"directory": str(dynamic_dir), "watch": True},
        },
        "serversTransport": {"forwardingTimeouts": {"idleConnTimeout": BACKEND_IDLE_TIMEOUT}},
        "api": {"dashboard": True},  # served by the router of admin_dynamic_config only
        "ping": {"entryPoint": ADMIN_ENTRYPOINT},
        "metrics": {
            "prometheus": {
                "entryPoint": ADMIN_ENTRYPOINT,
                "addEntryPointsLabels": True,
                "addRoutersLabels": True,
                "addServicesLabels": True,
                "buckets": list(LATENCY_BUCKETS_S),
            }
        },
    }
    if log is not None:
        config["accessLog"] = log
    experimental: dict[str, Any] = {}
    if fast_proxy:
        experimental["fastProxy"] = {}
    if user_plugin:
        experimental["localPlugins"] = static_plugins()
    if experimental:
        config["experimental"] = experimental
    return config


def render_static_config(**options: Any) -> str:
    """The static configuration as YAML text, for `traefik --configFile=...`; options as `static_config`'s."""
    return yaml.safe_dump(static_config(**options), sort_keys=False, default_flow_style=False)


def admin_dynamic_config(password: str, entrypoint: str = ADMIN_ENTRYPOINT) -> dict[str, Any]:
    """The router that serves Traefik's API and dashboard on the admin entry point, behind basic auth.

    User `operator`, password the operator's token. The token is 256 random bits, so the unsalted
    `{SHA}` form of htpasswd (which Traefik accepts) cannot be reversed by guessing.
    """
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return {
        "http": {
            "routers": {
                ADMIN_ROUTER: {
                    "entryPoints": [entrypoint],
                    "rule": "PathPrefix(`/api`) || PathPrefix(`/dashboard`)",
                    "middlewares": [ADMIN_AUTH_MIDDLEWARE],
                    "service": "api@internal",
                }
            },
            "middlewares": {
                ADMIN_AUTH_MIDDLEWARE: {
                    "basicAuth": {"users": [f"{ADMIN_USER}:{{SHA}}{digest}"], "realm": "recsys-canary"}
                }
            },
        }
    }


def render_admin_config(password: str, entrypoint: str = ADMIN_ENTRYPOINT) -> str:
    """`admin_dynamic_config` as YAML text, for the file provider's directory."""
    return yaml.safe_dump(admin_dynamic_config(password, entrypoint), sort_keys=False)
