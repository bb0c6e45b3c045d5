"""What `make bench` starts side by side: the gateway path, one Bento, the reference peer; and its database.

Every process is started here and stopped when the ExitStack closes. Nothing is shared with a running
`recsys up`: models, Bentos, database, Traefik config and ports are all temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench_bento import (
    OWN_SESSION,
    VENV_BIN,
    free_port,
    model_dir,
    spawn_bento,
    stop_process,
    wait_ready,
)

# role -> training profile; the versions are registered in this order (control v1, baseline v2, canary v3).
PROFILES = {"control": "control", "baseline": "baseline", "canary": "better"}
WEIGHTS = {"baseline": 85, "canary": 10, "control": 5}
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@dataclass
class Proc:
    """A started server: where it answers, how to tell it is ready, where it logs."""

    url: str
    popen: subprocess.Popen
    log_path: Path
    ready_path: str = "/readyz"

    def wait(self) -> Proc:
        wait_ready(self.url, self.popen, self.log_path, self.ready_path)
        return self


@dataclass
class Setup:
    """One thing under load: its URL, the processes it costs (children included), whether it logs."""

    name: str
    url: str
    pids: list[int]
    logs: bool = False  # writes a predictions row for every model response
    bento_urls: list[str] = field(default_factory=list)  # whose recsys_requests_total count 2xx responses
    bento_pids: list[int] = field(default_factory=list)  # one `bentoml serve` (arbiter + workers) each
    proxy_pid: int | None = None  # Traefik's, whose share of the CPU is reported apart


@dataclass(frozen=True)
class Database:
    url: str
    kind: str  # "postgres" or "sqlite"
    name: str  # the Postgres database (its server processes carry the name) or the SQLite file


def postgres_reachable(pg_admin_url: str = PG_ADMIN_URL) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_admin_url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def thread_schedstat(pid: int) -> dict[int, tuple[float, float]]:
    """For each thread of process `pid`: the seconds it has run on a core and the seconds it has waited
    on a run queue for one, to the nanosecond (Linux's /proc/PID/task/TID/schedstat; /proc/PID/stat
    counts in 10 ms ticks). {} where the kernel does not tell or the process has gone."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        with suppress(OSError, ValueError, IndexError):  # a thread that has just ended
            ran, waited = (task / "schedstat").read_text().split()[:2]
            out[int(task.name)] = (int(ran) / 1e9, int(waited) / 1e9)
    return out


def ran_s(pid: int) -> float:
    """Seconds every thread of process `pid` has run on a core so far (`thread_schedstat`)."""
    return sum(ran for ran, _ in thread_schedstat(pid).values())


def db_backend_pids(db: Database) -> list[int]:
    """The Postgres server processes whose title names the benchmark database ([] for SQLite)."""
    import psutil

    if db.kind != "postgres":
        return []
    out = []
    for p in psutil.process_iter(["cmdline"]):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cmdline = " ".join(p.info["cmdline"] or [])
            if cmdline.startswith("postgres") and db.name in cmdline:
                out.append(p.pid)
    return out


def create_database(stack: ExitStack, kind: str, workdir: Path, pg_admin_url: str = PG_ADMIN_URL) -> Database:
    """A fresh, migrated database: a new Postgres database (dropped at the end) or a new SQLite file."""
    from control_plane.db.engine import migrate

    if kind == "sqlite":
        path = workdir / f"recsys-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{path}"
        migrate(url)
        return Database(url, "sqlite", str(path))
    from sqlalchemy import create_engine, text

    name = f"recsys_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    stack.callback(drop)
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    return Database(url, "postgres", name)


def seed_roles(database_url: str, versions: dict[str, int]) -> None:
    """traffic_config as the control plane keeps it, so that every Bento logs its role."""
    from control_plane.db.engine import make_engine
    from control_plane.rollout.assignment import Assignment, Slot
    from control_plane.traffic.store import TrafficStore

    engine = make_engine(database_url)
    TrafficStore(engine).save(Assignment(**{role: Slot(versions[role], WEIGHTS[role]) for role in versions}))
    engine.dispose()


def spawn_bentos(
    stack: ExitStack, tags: dict[str, str], env: dict[str, str], workdir: Path, label: str
) -> dict[str, Proc]:
    """One `bentoml serve` per role, not waited for; role -> Proc."""
    procs = {}
    for role, tag in tags.items():
        log_path = workdir / f"serve-{label}-{role}.log"
        # Two servers of one version (logging on and off) need metrics directories of their own.
        child_env = {**env, "RECSYS_PROMETHEUS_DIR": str(workdir / f"prometheus-{label}-{role}")}
        url, popen = spawn_bento(stack, tag, child_env, log_path)
        procs[role] = Proc(url, popen, log_path)
    return procs


def spawn_traefik(
    stack: ExitStack,
    workdir: Path,
    label: str,
    bentos: dict[str, Proc],
    versions: dict[str, int],
    env: dict[str, str] | None = None,
) -> Proc:
    """Traefik with the stack's static config and the weighted split over `bentos`, not waited for."""
    from control_plane.settings import Settings
    from control_plane.stack.programs import traefik_env
    from control_plane.traffic import Backend, TraefikFileRouter, render_static_config

    settings = Settings.from_env({**os.environ, **(env or {})})
    tdir = workdir / f"traefik-{label}"
    shutil.rmtree(tdir, ignore_errors=True)  # a kept --work-dir holds the last run's
    dynamic_dir = tdir / "dynamic"
    dynamic_dir.mkdir(parents=True)
    port = free_port()
    (tdir / "traefik.yml").write_text(
        render_static_config(
            dynamic_dir=dynamic_dir,
            gateway_port=port,
            api_port=free_port(),
            access_log_path=tdir / "access.json",
            # as `recsys up` reads them; a variant can set them ('NAME:traefik:RECSYS_TRAEFIK_ACCESS_LOG=all')
            fast_proxy=settings.traefik_fast_proxy,
            access_log_mode=settings.traefik_access_log,
        )
    )
    router = TraefikFileRouter(dynamic_dir, tmp_dir=tdir / ".tmp")
    router.apply({role: Backend(versions[role], p.url) for role, p in bentos.items()}, WEIGHTS)
    log_path = tdir / "traefik.log"
    with open(log_path, "w") as log:
        popen = subprocess.Popen(
            [str(VENV_BIN / "traefik"), f"--configFile={tdir / 'traefik.yml'}"],
            env={**os.environ, **traefik_env(), **(env or {})},  # as the local stack runs it
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=OWN_SESSION,
        )
    stack.callback(stop_process, popen)
    return Proc(f"http://127.0.0.1:{port}", popen, log_path)


def wait_gateway(proc: Proc, body: bytes, timeout_s: float = 60) -> None:
    """Until a /predict through Traefik answers 200 (the file provider and health checks are up)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise SystemExit(f"traefik exited; see {proc.log_path}")
        try:
            r = httpx.post(f"{proc.url}/predict", content=body, headers={"content-type": "application/json"})
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"no 200 through Traefik at {proc.url} after {timeout_s:.0f} s; see {proc.log_path}")


def spawn_peer(
    stack: ExitStack,
    workdir: Path,
    env: dict[str, str],
    tags: dict[str, str],
    versions: dict[str, int],
    workers: int,
) -> Proc:
    """The reference peer (benchmarks/peer_app.py) with `workers` uvicorn workers, not waited for."""
    models = [
        {"version": versions[role], "role": role, "weight": WEIGHTS[role], "path": str(model_dir(env, tag))}
        for role, tag in tags.items()
    ]
    port = free_port()
    log_path = workdir / f"peer-{workers}w.log"
    with open(log_path, "w") as log:
        popen = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "peer_app.py"), "--port", str(port), "--workers", str(workers),
             "--models", json.dumps(models)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=OWN_SESSION,
        )  # fmt: skip
    stack.callback(stop_process, popen)
    return Proc(f"http://127.0.0.1:{port}", popen, log_path)
