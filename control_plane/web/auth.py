"""Who may change things: the operator token, its file, the UI session, and the checks on writes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from pathlib import Path

from flask import Request, session

from control_plane.settings import Settings

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_FILE = "api-token"
SECRET_KEY_FILE = "secret-key"
SESSION_KEY = "operator"


def api_token_path(settings: Settings) -> Path:
    return settings.state_dir / TOKEN_FILE


def ensure_api_token(settings: Settings) -> str:
    """The operator token: `settings.api_token`, else `<state_dir>/api-token`, created (0600) if absent."""
    if settings.api_token:
        return settings.api_token
    return _read_or_create(api_token_path(settings), lambda: secrets.token_urlsafe(32))


def ensure_secret_key(settings: Settings) -> str:
    """Flask's session-signing key from `<state_dir>/secret-key`, created (0600) on first use."""
    return _read_or_create(settings.state_dir / SECRET_KEY_FILE, lambda: secrets.token_hex(32))


def _read_or_create(path: Path, make) -> str:
    """Read a secret file, or create it atomically so concurrent workers all end up with the same value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp files are 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(make() + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process created it first: theirs wins
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        log.info("secret file created", extra={"path": str(path)})
    if path.stat().st_mode & 0o077:
        log.warning("secret file is readable by other users; chmod 600 it", extra={"path": str(path)})
    value = path.read_text().strip()
    if not value:
        raise RuntimeError(f"{path} is empty; delete it to have a new secret created")
    return value


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
