"""The one place errors become HTTP: JSON for the API, a page (or a flash message) for the UI."""

from __future__ import annotations

import logging

from flask import Flask, flash, g, jsonify, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from control_plane.errors import RecsysError

log = logging.getLogger(__name__)


class Unauthorized(RecsysError):
    """A write without the operator's credentials."""

    http_status = 401


def register_error_handler(app: Flask) -> None:
    app.register_error_handler(Exception, handle_error)


def handle_error(exc: Exception):
    """Map any exception to a status and a message; never a traceback to the client."""
    if isinstance(exc, HTTPException) and (exc.code is None or exc.code < 400):
        return exc  # redirects and the like pass through untouched
    if isinstance(exc, CSRFError):
        status, message = 403, f"{exc.description} Reload the page and try again."
    elif isinstance(exc, HTTPException):
        status, message = exc.code, exc.description
    elif isinstance(exc, RecsysError):
        status, message = exc.http_status, str(exc)
    elif isinstance(exc, OperationalError | InterfaceError):  # the database is unreachable, not the input bad
        log.warning("database error", extra={"error": exc.__class__.__name__, "path": request.path})
        status, message = 503, "the database is unavailable; try again shortly"
    else:
        log.exception("unhandled error", extra={"path": request.path})
        status, message = 500, f"internal error (request id {g.get('request_id', '-')})"
    return _respond(status, message, exc)


def _respond(status: int, message: str, exc: Exception):
    if request.path.startswith("/api/") or request.path in ("/api", "/feedback"):
        resp = jsonify(error=message)
        resp.status_code = status
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="recsys-canary"'
        return resp
    # A refused UI action (a conflict, a bad value) goes back to the page with the reason shown.
    if (
        request.blueprint == "ui"
        and request.method == "POST"
        and isinstance(exc, RecsysError)
        and status != 401
    ):
        flash(message, "error")
        return redirect(url_for("ui.index"), code=303)
    return render_template("error.html", status=status, message=message), status
