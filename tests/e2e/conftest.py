"""One real local stack for the whole e2e session: `recsys up` in a temporary directory, `recsys down` at the end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

RECSYS = str(Path(sys.executable).with_name("recsys"))


@dataclass
class Stack:
    """A running local stack and how to reach it."""

    state_dir: Path
    env: dict[str, str]
    gateway: str
    control_plane: str
    token: str
    label_token: str = ""

    def recsys(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RECSYS, *args],
            env=self.env,
            cwd=self.state_dir.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def settings(self):
        from control_plane.settings import Settings

        return Settings.from_env(self.env)

    def label(self, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        """POST /feedback through the gateway with the label-ingest token."""
        auth = {"Authorization": f"Bearer {self.label_token}"}
        return self.post(f"{self.gateway}/feedback", body, {**auth, **(headers or {})})

    def post(
        self, url: str, body, headers: dict | None = None, timeout: float = 10
    ) -> tuple[int, dict, dict]:
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), _decode(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), _decode(exc.read())


def _decode(raw: bytes):
    """JSON when the body is JSON (the services' answers), else the text (Traefik's own refusals)."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def stack_processes(state_dir: Path) -> list[psutil.Process]:
    """Every live process whose command line or environment points into this stack's state directory."""
    found = []
    needle = str(state_dir)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (
                any(needle in part for part in (p.info["cmdline"] or []))
                or p.environ().get("RECSYS_STATE_DIR") == needle
            ):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [p for p in found if p.pid != os.getpid()]


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    work = tmp_path_factory.mktemp("stack")
    state = work / ".recsys"
    env = {
        **os.environ,
        "RECSYS_STATE_DIR": str(state),
        "RECSYS_GATEWAY_PORT": str(free_port()),
        "RECSYS_TRAEFIK_API_PORT": str(free_port()),
        "RECSYS_CONTROL_PLANE_PORT": str(free_port()),
        "RECSYS_MLFLOW_PORT": str(free_port()),
        "RECSYS_PROMETHEUS_PORT": str(free_port()),
        "RECSYS_EMBEDDED_REDIS_PORT": str(free_port()),
        "RECSYS_WORKER_METRICS_PORT": str(free_port()),
        "RECSYS_BENTO_BASE_PORT": str(random.randrange(21000, 29000, 20)),
        "RECSYS_EVAL_INTERVAL_S": "2",
        "RECSYS_LABEL_WINDOW_S": "1",
        # every request in the gateway's access log (the default keeps problems only), so that a test
        # can follow a served request's id from the gateway to its label
        "RECSYS_TRAEFIK_ACCESS_LOG": "all",
        "BENTOML_HOME": str(state / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    for key in ("DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI", "TRAFFIC_WEIGHTS"):
        env.pop(key, None)
    s = Stack(
        state,
        env,
        f"http://127.0.0.1:{env['RECSYS_GATEWAY_PORT']}",
        f"http://127.0.0.1:{env['RECSYS_CONTROL_PLANE_PORT']}",
        "",
    )
    t0 = time.monotonic()
    up = s.recsys("up", timeout=900, check=False)
    if up.returncode != 0:
        logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in (state / "logs").glob("*.log"))
        s.recsys("down", check=False)
        pytest.fail(f"recsys up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}\n{logs}")
    s.up_seconds = time.monotonic() - t0
    s.up_output = up.stdout
    s.token = (state / "api-token").read_text().strip()
    s.label_token = (state / "label-token").read_text().strip()
    yield s
    down = s.recsys("down", check=False, timeout=120)
    assert down.returncode == 0, down.stderr
    time.sleep(1)
    left = stack_processes(state)
    for p in left:
        p.kill()
    assert not left, f"processes left behind by recsys down: {[p.info['cmdline'] for p in left]}"
