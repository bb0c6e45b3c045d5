"""The Flask app factory: all wiring happens in create_app, nothing at import time."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.engine import make_url

from control_plane.context import Context
from control_plane.credentials import (
    ensure_api_token,
    ensure_label_token,
    ensure_request_id_key,
    ensure_secret_key,
)
from control_plane.db.engine import ping
from control_plane.request_ids import RequestIdSigner
from control_plane.settings import Settings
from control_plane.web import api, feedback, ui
from control_plane.web.errors import register_error_handler
from control_plane.web.logs import configure_logging
from control_plane.web.metrics import install_metrics
from control_plane.web.wiring import EXTENSION, Wiring

log = logging.getLogger("control_plane.web")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
READY_TIMEOUT_S = 2
QUIET_PATHS = {"/metrics", "/healthz", "/readyz"}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(settings: Settings | None = None, ctx: Context | None = None) -> Flask:
    """The control plane's web app; pass `ctx` to run over fakes, else it is bootstrapped on first use."""
    if settings is None:
        settings = ctx.settings if ctx is not None else Settings.from_env()
    configure_logging()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=ensure_secret_key(settings),
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        SESSION_COOKIE_NAME="recsys_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        WTF_CSRF_TIME_LIMIT=12 * 3600,  # a dashboard left open for a shift still submits
    )
    wiring = Wiring(
        settings=settings,
        api_token=ensure_api_token(settings),
        ctx=ctx,
        label_token=ensure_label_token(settings),
        request_ids=RequestIdSigner.from_secret(ensure_request_id_key(settings)),
    )
    app.extensions[EXTENSION] = wiring

    csrf = CSRFProtect(app)
    csrf.exempt(api.bp)  # the API authenticates by Bearer header, which a browser never sends on its own
    csrf.exempt(feedback.bp)  # labels come with their own Bearer token, never from a browser session
    app.register_blueprint(api.bp)
    app.register_blueprint(feedback.bp)
    app.register_blueprint(ui.bp)
    register_error_handler(app)
    install_metrics(app, wiring.context, settings.prometheus_multiproc_dir)
    app.add_template_filter(_when, "when")
    app.add_template_filter(_num, "num")
    app.add_template_filter(_flat, "flat")

    @app.before_request
    def _start() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = CSP
            response.headers["Cache-Control"] = "no-store"
        log.log(
            logging.DEBUG if request.path in QUIET_PATHS else logging.INFO,
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "endpoint": request.endpoint,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            },
        )
        return response

    @app.get("/healthz")
    def healthz():
        return jsonify(status="alive")

    @app.get("/readyz")
    def readyz():
        name = _describe_database(wiring.ctx.engine.url if wiring.ctx else settings.database_url)
        try:
            ping(wiring.context().engine, READY_TIMEOUT_S)
        except Exception as exc:
            log.warning("not ready", extra={"database": name, "error": exc.__class__.__name__})
            return jsonify(
                status="unavailable", error=f"{name} is not reachable ({exc.__class__.__name__})"
            ), 503
        return jsonify(status="ready", database=name)

    return app


def _describe_database(url: Any) -> str:
    """Names the database without its password, e.g. `postgresql database 'recsys' at db:5432`."""
    try:
        u = make_url(url)
    except Exception:
        return "the database"
    if u.get_backend_name() == "sqlite":
        return f"sqlite database {u.database or ':memory:'}"
    return f"{u.get_backend_name()} database {u.database!r} at {u.host or 'localhost'}:{u.port or 'default port'}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() or abs(value) >= 10**digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested stats as (dotted name, leaf) rows for a two-column table; pairs stay together as intervals."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return [(prefix, f"[{_num(value[0])}, {_num(value[1])}]")]
    if isinstance(value, list | tuple):
        return [row for i, v in enumerate(value) for row in _flat(v, f"{prefix}[{i}]")]
    return [(prefix, value)]
