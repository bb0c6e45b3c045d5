"""The stack's secrets, each from its environment variable or a 0600 file in the state directory.

The operator token (writes to the control plane), the label-ingest token (`/feedback`), the key that signs
the request ids the Bentos issue (docs/labels.md) and the embedded Redis' password. A file is created on
first use, atomically, so concurrent processes all end up with the same value; `recsys up` creates all of
them before it starts anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from control_plane.settings import REDIS_PASSWORD_FILE, Settings

log = logging.getLogger(__name__)

API_TOKEN_FILE = "api-token"
LABEL_TOKEN_FILE = "label-token"
REQUEST_ID_KEY_FILE = "request-id-key"
SECRET_KEY_FILE = "secret-key"
MLFLOW_SECRET_KEY_FILE = "mlflow-secret-key"


def api_token_path(settings: Settings) -> Path:
    return settings.state_dir / API_TOKEN_FILE


def ensure_api_token(settings: Settings) -> str:
    """The operator token: `settings.api_token`, else `<state_dir>/api-token`, created (0600) if absent."""
    return settings.api_token or read_or_create(api_token_path(settings), _token)


def ensure_label_token(settings: Settings) -> str:
    """The label-ingest token: `settings.label_token`, else `<state_dir>/label-token` (0600)."""
    return settings.label_token or read_or_create(settings.state_dir / LABEL_TOKEN_FILE, _token)


def ensure_request_id_key(settings: Settings) -> str:
    """The key the Bentos sign request ids with and `/feedback` checks them with (shared by both)."""
    return settings.request_id_key or read_or_create(
        settings.state_dir / REQUEST_ID_KEY_FILE, lambda: secrets.token_hex(32)
    )


def ensure_redis_password(settings: Settings) -> str:
    """The embedded redis-server's password: `settings.redis_password`, else `<state_dir>/redis-password`."""
    return settings.redis_password or read_or_create(settings.state_dir / REDIS_PASSWORD_FILE, _token)


def ensure_secret_key(settings: Settings) -> str:
    """Flask's session-signing key from `<state_dir>/secret-key`, created (0600) on first use."""
    return read_or_create(settings.state_dir / SECRET_KEY_FILE, lambda: secrets.token_hex(32))


def ensure_mlflow_secret_key(settings: Settings) -> str:
    """The key the MLflow server's basic-auth app signs its CSRF tokens with (`<state_dir>/mlflow-secret-key`)."""
    return read_or_create(settings.state_dir / MLFLOW_SECRET_KEY_FILE, lambda: secrets.token_hex(32))


def _token() -> str:
    # hex: safe in a URL's password part, a Bearer header and a Redis config line alike
    return secrets.token_hex(32)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600 from the start), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_or_create(path: Path, make: Callable[[], str]) -> str:
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
