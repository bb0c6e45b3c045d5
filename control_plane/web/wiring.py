"""The app's handles on the service layer: a Context built on first use, and the operator token."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import current_app

from control_plane.context import Context, bootstrap
from control_plane.request_ids import RequestIdSigner
from control_plane.settings import Settings

EXTENSION = "recsys"


@dataclass
class Wiring:
    """What create_app hangs on the Flask app; the Context is only built when a request needs it."""

    settings: Settings
    api_token: str
    ctx: Context | None = None
    label_token: str = ""  # /feedback's own credential (docs/labels.md); empty refuses every label
    request_ids: RequestIdSigner | None = None  # checks that a label names an id a Bento issued
    label_sink: object | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def context(self) -> Context:
        if self.ctx is None:
            with self._lock:
                if self.ctx is None:
                    self.ctx = bootstrap(self.settings)
        return self.ctx


def wiring() -> Wiring:
    return current_app.extensions[EXTENSION]


def current_ctx() -> Context:
    return wiring().context()


def api_token() -> str:
    return wiring().api_token
