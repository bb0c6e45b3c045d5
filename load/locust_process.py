"""Locust, headless, through the gateway, as a child process: how the demo and the soak start their load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from control_plane.credentials import ensure_label_token
from control_plane.errors import RecsysError
from control_plane.settings import Settings

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def start_locust(settings: Settings, users: int, log_path: Path, *options: str) -> subprocess.Popen:
    """`locust -f load/locustfile.py --headless` with `users` users at the gateway, plus `options`."""
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():  # Locust is not a runtime dependency of the product: the `load` extra
        raise RecsysError(f"{locust} not found: the load needs the `load` extra (pip install -e '.[load]')")
    cmd = [
        str(locust),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(users),
        "-r",
        str(users),
        "--host",
        settings.effective_gateway_url,
        *options,
    ]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            # the label-ingest token in the environment, not on a command line that `ps` shows
            env={**os.environ, "PYTHONUNBUFFERED": "1", "RECSYS_LABEL_TOKEN": ensure_label_token(settings)},
        )
