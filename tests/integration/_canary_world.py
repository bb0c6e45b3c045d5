"""One real `bentoml serve` (the canary, v2) and the control plane's context, reaching a Postgres database
through a TCP proxy that a test can cut; the baseline (v1) is a fake ready endpoint whose rows the test
inserts. Shared by the database-outage and the full-disk tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import insert

from control_plane import jobs, queries
from control_plane.context import Context, bootstrap
from control_plane.db.schema import labels
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.settings import Settings
from control_plane.traffic_ops import apply_assignment
from tests.conftest import free_port, ready_servers, wait_for
from tests.integration._tcp_proxy import TcpProxy
from tests.integration.test_predlog_postgres import via_port
from tests.steady_traffic import Traffic

VENV_BIN = Path(sys.executable).parent
FEATURES = [0.6, 1.2, 0.3, 1.6, 0.25, 28.0, 40.0, 4.2, 0.1, 0.4, 1.0, 0.5, -0.8, 0.0, 2.0, 1.0]


@dataclass
class CanaryWorld:
    ctx: Context
    proxy: TcpProxy
    bento: str  # the canary's URL
    work: Path
    env: dict[str, str]
    port: int
    proc: subprocess.Popen | None = None
    _logs: list[Path] = field(default_factory=list)

    def serve(self, timeout_s: float = 120) -> None:
        """Start `bentoml serve recsys:v2` in a process group of its own and wait until it is ready."""
        log_path = self.work / f"serve-{len(self._logs)}.log"
        self._logs.append(log_path)
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    str(VENV_BIN / "bentoml"),
                    "serve",
                    "recsys:v2",
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                ],
                env=self.env,
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready():
            assert self.proc.poll() is None, log_path.read_text()[-4000:]
            try:
                return httpx.get(f"{self.bento}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s, "bentoml serve ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_state(self) -> dict:
        return httpx.get(f"{self.bento}/predlog", timeout=5).json()


@contextlib.contextmanager
def canary_world(work: Path, database: str, redis_url: str, **extra_env: str) -> Iterator[CanaryWorld]:
    """Versions 1 (baseline) and 2 (canary) registered; v2 built and served, everything through the proxy."""
    from training.train import train_and_register

    uri = f"sqlite:///{work / 'mlflow.db'}"
    for profile in ("baseline", "better"):
        train_and_register(
            tracking_uri=uri,
            artifact_location=str(work / "art"),
            profile=profile,
            n_rows=400,
            iterations=20,
            progress=False,
        )
    pg = urlsplit(database)
    proxy = TcpProxy(free_port(), (pg.hostname, pg.port or 5432)).start()
    env = {
        **os.environ,
        "BENTOML_HOME": str(work / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MLFLOW_TRACKING_URI": uri,
        "RECSYS_STATE_DIR": str(work / "state"),
        "DATABASE_URL": via_port(database, proxy.port),
        "RECSYS_SPILL_DIR": str(work / "spill"),
        "REDIS_URL": redis_url,
        **extra_env,
    }
    built = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bentos.build", "--version", "2"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    port = free_port()
    (fake,) = ready_servers(1)
    bento = f"http://127.0.0.1:{port}"
    settings = Settings.from_env(
        {**env, "RECSYS_BENTO_URLS": f"1=http://127.0.0.1:{fake.server_address[1]},2={bento}"}
    )
    ctx = bootstrap(settings)
    ctx.drain_s = 0
    world = CanaryWorld(ctx, proxy, bento, work, env, port)
    try:
        world.serve()
        ctx.registry.set_alias("baseline", 1)
        apply_assignment(ctx, Assignment(baseline=Slot(1, 100)))
        yield world
    finally:
        world.stop()
        fake.shutdown()
        proxy.stop()
        ctx.engine.dispose()


@contextlib.contextmanager
def unrecorded_ticks_cleared(redis_url: str) -> Iterator[str]:
    """`redis_url`, with the scheduler's memory of unrecorded ticks cleared before and after."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(jobs.UNRECORDED_TICKS_KEY)
    try:
        yield redis_url
    finally:
        client.delete(jobs.UNRECORDED_TICKS_KEY)
        client.close()


def steady_load(url: str, rate_per_s: float, prefix: str) -> Traffic:
    """Predictions at `rate_per_s` straight to the Bento, marked as if Traefik's split had sent them."""
    return Traffic(url, rate_per_s, FEATURES, headers={"x-recsys-route": "weighted"}, prefix=prefix)


def baseline_rows(engine, moments, rng) -> None:
    """What the baseline's Bento would have logged at 50 % (it is a fake here): a twin of each of the
    canary's rows at each of `moments` (so that the windows, which stop short of now while the newest rows
    arrive, count the two arms alike), slow, with labels."""
    rows = [
        {
            "request_id": f"base-{uuid.uuid4().hex}",
            "ts": t,
            "model_version": 1,
            "role": "baseline",
            "route": "weighted",
            "endpoint": "predict",
            "features": None,
            "score": float(rng.random()),
            "latency_ms": 500 + rng.random(),
            "status": 200,
        }
        for t in moments
    ]
    with engine.begin() as conn:
        queries.insert_predictions(conn, rows)
        conn.execute(
            insert(labels),
            [{"request_id": r["request_id"], "label": int(rng.random() < 0.3), "ts": r["ts"]} for r in rows],
        )
