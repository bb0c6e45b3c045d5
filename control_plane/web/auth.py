"""Who may change things: the operator token's checks and the UI session (the token itself: control_plane/credentials.py)."""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Request, session

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SESSION_KEY = "operator"


def token_matches(given: str, token: str) -> bool:
    """Constant-time comparison; an empty token never matches."""
    if not given or not token:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def bearer_ok(request: Request, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>`."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token_matches(given.strip(), token)


def _session_mark(token: str) -> str:
    """What the session stores: derived from the token, so rotating the token ends every session."""
    return hashlib.sha256(b"recsys-ui-session:" + token.encode()).hexdigest()


def log_in(token: str) -> None:
    session.clear()
    session[SESSION_KEY] = _session_mark(token)


def log_out() -> None:
    session.clear()


def operator_logged_in(token: str) -> bool:
    return hmac.compare_digest(session.get(SESSION_KEY, ""), _session_mark(token))
