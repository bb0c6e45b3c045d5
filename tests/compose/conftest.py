"""One compose stack for the whole compose tier: the local build path's images, `docker-compose up`, down.

The stack is a compose project of its own (its own containers, network, volumes and Bento containers)
with free ports on 127.0.0.1, so that it never meets a developer's `make compose-up` stack.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"
COMPOSE_FILES = "docker-compose.yml:infra/docker/compose.local.yml"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.compose)


def engine_problem() -> str | None:
    """Why the compose tier cannot run here, or None."""
    if shutil.which("docker-compose") is None:
        return "docker-compose is not installed (make system-deps installs it)"
    if not os.path.exists(DOCKER):
        return f"{DOCKER} (Debian's docker.io, with BuildKit) is not installed"
    ok = subprocess.run([DOCKER, "version"], capture_output=True).returncode == 0
    return None if ok else "the Docker engine does not answer (make system-deps starts dockerd)"


@dataclass
class ComposeStack:
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def control_plane(self) -> str:
        return f"http://127.0.0.1:{self.ports['control_plane']}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker-compose", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def docker(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
        return result.stdout.strip()

    def sql(self, query: str) -> list[str]:
        """Rows of `query` in the containerized Postgres, one tab-separated line each."""
        out = self.compose(
            "exec", "-T", "postgres", "psql", "-U", "recsys", "-d", "recsys", "-At", "-F", "\t", "-c", query
        )
        return [line for line in out.stdout.splitlines() if line]

    def recsys(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`recsys ...` in a one-off container of the app image on the stack's networks."""
        return self.compose(
            "run", "--rm", "--no-deps", "-T", "seed", "recsys", *args, timeout=timeout, check=False
        )

    def bento_containers(self) -> list[str]:
        out = self.docker(
            "ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", "label=recsys.bento", "--format", "{{.Names}}",
        )  # fmt: skip
        return sorted(out.split())

    def bento_images(self) -> list[str]:
        """The Bento images the gate labelled with this project (tagged or not), as name:tag or id."""
        out = self.docker(
            "image", "ls", "--filter", f"label=recsys.project={self.project}",
            "--format", "{{.Repository}}:{{.Tag}}@{{.ID}}",
        )  # fmt: skip
        return sorted(out.split())

    def remove_bento_images(self) -> None:
        """What `make compose-down` does after `docker-compose down --volumes`."""
        subprocess.run(
            ["infra/docker/remove-bento-images.sh", self.project], cwd=REPO, capture_output=True, timeout=120
        )

    def predict(self, headers: dict | None = None, timeout: float = 5) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"{self.gateway}/predict",
            data=json.dumps({"features": [0.1] * 16}).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}
        except (urllib.error.URLError, OSError):
            return 0, {}

    @property
    def api_token(self) -> str:
        return self.env["RECSYS_API_TOKEN"]

    def mlflow_json(self, path: str):
        """GET on the MLflow server's REST API as its basic-auth user `operator`."""
        auth = base64.b64encode(f"operator:{self.api_token}".encode()).decode()
        return self.get_json(f"{self.mlflow}{path}", {"Authorization": f"Basic {auth}"})

    def get_json(self, url: str, headers: dict | None = None):
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return json.loads(resp.read())


SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "RECSYS_API_TOKEN",
    "RECSYS_LABEL_TOKEN",
    "RECSYS_REQUEST_ID_KEY",
    "MLFLOW_SECRET_KEY",
)


def compose_env(project: str, ports: dict[str, int]) -> dict[str, str]:
    """The stack's environment: its own project name and ports, fresh secrets (as compose-secrets.sh)."""
    return {
        **{name: secrets.token_hex(32) for name in SECRETS},
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "COMPOSE_FILE": COMPOSE_FILES,
        "COMPOSE_PROJECT_NAME": project,
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "RECSYS_GATEWAY_PORT": str(ports["gateway"]),
        "RECSYS_TRAEFIK_API_PORT": str(ports["traefik_api"]),
        "RECSYS_CONTROL_PLANE_PORT": str(ports["control_plane"]),
        "RECSYS_MLFLOW_PORT": str(ports["mlflow"]),
        "RECSYS_PROMETHEUS_PORT": str(ports["prometheus"]),
        "COMPOSE_HTTP_TIMEOUT": "300",
    }


@pytest.fixture(scope="session")
def compose_stack():
    problem = engine_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the compose tier cannot run: {problem}")
        pytest.skip(problem)
    t0 = time.monotonic()
    # RECSYS_COMPOSE_IMAGES_BUILT=1: the images are there already (a developer's rerun; never in CI).
    skip_build = os.environ.get("RECSYS_COMPOSE_IMAGES_BUILT") == "1" and not os.environ.get("CI")
    build = subprocess.run(
        ["true" if skip_build else "infra/docker/build-images.sh"],
        cwd=REPO,
        env={**os.environ, "RECSYS_IMAGES": "local"},
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert skip_build or build.returncode == 0, f"building the images failed:\n{build.stdout}\n{build.stderr}"
    ports = {k: free_port() for k in ("gateway", "traefik_api", "control_plane", "mlflow", "prometheus")}
    project = f"recsystest{uuid.uuid4().hex[:8]}"
    stack = ComposeStack(project, compose_env(project, ports), ports)
    stack.timings_s["images"] = time.monotonic() - t0
    t1 = time.monotonic()
    try:
        up = stack.compose("up", "-d", timeout=1800, check=False)
        if up.returncode != 0:
            logs = stack.compose("logs", "--tail", "40", check=False).stdout
            raise AssertionError(f"docker-compose up failed:\n{up.stderr}\n{logs}")
        wait_for(lambda: stack.predict()[0] == 200, 300, "the gateway's first answer")
        stack.timings_s["up_to_first_answer"] = time.monotonic() - t1
        print(f"\ncompose tier timings (s): {stack.timings_s}")
        yield stack
    finally:
        if os.environ.get("RECSYS_KEEP_COMPOSE_STACK"):
            print(f"kept compose project {project}: {stack.env}")
        else:
            stack.compose("down", "--remove-orphans", "--volumes", "--timeout", "10", check=False)
            stack.remove_bento_images()
