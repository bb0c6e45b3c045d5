"""Local processes: one `bentoml serve` per version, supervised (restarted if it dies) by supervisord."""

from __future__ import annotations

import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

from bentos import build as bento_build
from control_plane.errors import DeployFailed
from control_plane.settings import Settings
from control_plane.supervisor import BIN, Program, Supervisor, program

log = logging.getLogger(__name__)
BENTO_NAME = re.compile(r"^bento-v(\d+)$")


def is_ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def bento_port(settings: Settings, version: int) -> int:
    return settings.bento_base_port + version


def bento_program(settings: Settings, version: int) -> Program:
    """`bentoml serve recsys:vN` on its own port, restarted by supervisord if it dies."""
    return program(
        settings,
        f"bento-v{version}",
        [
            str(BIN / "bentoml"),
            "serve",
            f"recsys:v{version}",
            "--host",
            settings.bind_host,
            "--port",
            str(bento_port(settings, version)),
        ],
        # Each Bento keeps its Prometheus files apart (bentos/bentoml_fixes.py), so /metrics is its own.
        # RECSYS_ACCESS_LOG: one JSON line per request with its id, so a request can be followed from the
        # gateway (whose access log keeps problems, or every request with RECSYS_TRAEFIK_ACCESS_LOG=all)
        # to the Bento, the prediction row and the label (costs a few % of throughput).
        env={"RECSYS_SPILL_DIR": str(settings.spill_dir / f"v{version}"), "RECSYS_ACCESS_LOG": "on"},
        startsecs=3,
        stopwaitsecs=30,
    )


def build_version_bento(settings: Settings, version: int) -> str:
    """Build (or reuse) the Bento of registry version `version` in settings.bentoml_home; its tag."""
    # Built in this process into settings.bentoml_home, which `bentoml serve` (or the Bento image's build)
    # serves from (without it, a caller such as `make soak` built into ~/bentoml and every Bento failed to
    # start). bentos.build imports BentoML and MLflow only when it builds.
    try:
        return bento_build.build_bento(
            version,
            tracking_uri=settings.mlflow_tracking_uri,
            model_name=settings.registered_model_name,
            bentoml_home=settings.bentoml_home,
        )
    except Exception as exc:  # the registry or BentoML refused: nothing was started
        raise DeployFailed(f"could not build the Bento for version {version}: {exc}") from exc


class LocalDeployer:
    """Builds the version's Bento if needed, runs it under supervisord, waits for /readyz.

    `on_endpoints` is told every running version's URL after each change (the local stack's
    Prometheus scrapes them: control_plane/stack/prometheus_config.py).
    """

    def __init__(
        self,
        settings: Settings,
        supervisor: Supervisor | None = None,
        ready_timeout_s: float = 180,
        on_endpoints: Callable[[Mapping[int, str]], None] | None = None,
    ):
        self.settings = settings
        self.supervisor = supervisor or Supervisor(settings.state_dir)
        self.ready_timeout_s = ready_timeout_s
        self.on_endpoints = on_endpoints

    def url(self, version: int) -> str:
        return f"http://{self.settings.bind_host}:{bento_port(self.settings, version)}"

    def build(self, version: int) -> str:
        return build_version_bento(self.settings, version)

    def _start(self, version: int) -> None:
        self.supervisor.add(bento_program(self.settings, version))
        self._publish_targets()

    def _publish_targets(self) -> None:
        if self.on_endpoints is not None:
            self.on_endpoints(self.endpoints())

    def deploy(self, version: int) -> str:
        self.build(version)
        self._start(version)
        url = self.url(version)
        deadline = time.monotonic() + self.ready_timeout_s
        watch = _StartWatch()
        while not self.ready(url):
            crashed = watch.crash_loop(self.supervisor.processes().get(f"bento-v{version}"))
            if crashed or time.monotonic() > deadline:
                self.undeploy(version)
                why = crashed or f"did not answer {url}/readyz within {self.ready_timeout_s:.0f} s"
                raise DeployFailed(f"version {version} {why}{self._log_tail(version)}")
            time.sleep(0.5)
        log.info("deployed", extra={"version": version, "url": url})
        return url

    @staticmethod
    def ready(url: str) -> bool:
        return is_ready(url)

    def _log_tail(self, version: int, lines: int = 5) -> str:
        """The last lines of the Bento's log, for the error a person reads."""
        path = self.settings.log_dir / f"bento-v{version}.log"
        try:
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return f"; the end of {path}:\n" + "\n".join(tail) if tail else ""

    def start_many(self, versions: list[int]) -> dict[int, str]:
        """Start several versions at once (they load in parallel) and wait for all of them."""
        for v in versions:
            self.build(v)
        for v in versions:
            self._start(v)
        return {v: self.deploy(v) for v in versions}

    def undeploy(self, version: int) -> None:
        self.supervisor.remove(f"bento-v{version}")
        self._publish_targets()

    def endpoints(self) -> dict[int, str]:
        out = {}
        for name in self.supervisor.processes():
            m = BENTO_NAME.match(name)
            if m:
                out[int(m.group(1))] = self.url(int(m.group(1)))
        return out


class _StartWatch:
    """Tells a process that keeps dying while it starts from one that is only slow to load."""

    MAX_STARTS = 3  # a third start that has not answered yet: it will not

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.backoffs = 0
        self._last_state = ""

    def crash_loop(self, info: dict | None) -> str | None:
        """Why the process is given up on (supervisor's FATAL, or a third start), or None to keep waiting."""
        if not info:
            return None
        state = info.get("statename", "")
        if state == "FATAL":
            return "could not be started (supervisor gave up on it)"
        if info.get("pid"):
            self.pids.add(int(info["pid"]))
        if state in ("BACKOFF", "EXITED") and self._last_state != state:
            self.backoffs += 1
        self._last_state = state
        starts = max(len(self.pids), self.backoffs + 1)
        if starts >= self.MAX_STARTS:
            return f"exited {starts - 1} times while starting"
        return None
