"""Local processes: one `bentoml serve` per version, supervised (restarted if it dies) by supervisord."""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request

from control_plane.errors import DeployFailed
from control_plane.settings import Settings
from control_plane.stack import programs
from control_plane.stack.supervisor import Supervisor

log = logging.getLogger(__name__)
BENTO_NAME = re.compile(r"^bento-v(\d+)$")


def is_ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def build_version_bento(settings: Settings, version: int) -> str:
    """Build (or reuse) the Bento for registry version `version` in settings.bentoml_home; its tag."""
    # The Bento is built in this process and served from settings.bentoml_home: BentoML reads
    # BENTOML_HOME once, when first imported, so it is set before that (without it, a caller such as
    # `make soak` built into ~/bentoml and every Bento failed to start).
    home = str(settings.bentoml_home)
    os.environ.setdefault("BENTOML_HOME", home)
    if os.environ["BENTOML_HOME"] != home:
        raise DeployFailed(
            f"BENTOML_HOME is {os.environ['BENTOML_HOME']}, but the stack serves its Bentos from {home}"
        )
    from bentos.build import build_bento

    try:
        return build_bento(
            version, tracking_uri=settings.mlflow_tracking_uri, model_name=settings.registered_model_name
        )
    except Exception as exc:  # the registry or BentoML refused: nothing was started
        raise DeployFailed(f"could not build the Bento for version {version}: {exc}") from exc


class LocalDeployer:
    """Builds the version's Bento if needed, runs it under supervisord, waits for /readyz."""

    def __init__(
        self, settings: Settings, supervisor: Supervisor | None = None, ready_timeout_s: float = 180
    ):
        self.settings = settings
        self.supervisor = supervisor or Supervisor(settings.state_dir)
        self.ready_timeout_s = ready_timeout_s

    def url(self, version: int) -> str:
        return f"http://{self.settings.bind_host}:{programs.bento_port(self.settings, version)}"

    def build(self, version: int) -> str:
        return build_version_bento(self.settings, version)

    def _start(self, version: int) -> None:
        self.supervisor.add(programs.bento(self.settings, version))
        self._publish_targets()

    def _publish_targets(self) -> None:
        """Tell the local Prometheus which Bentos to scrape (file-based service discovery)."""
        from control_plane.stack.prometheus_config import write_bento_targets

        write_bento_targets(self.settings, self.endpoints())

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
