"""`recsys up`, `down` and `status`: the whole system on one machine, on embedded defaults."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from control_plane.context import bootstrap
from control_plane.credentials import (
    ensure_api_token,
    ensure_label_token,
    ensure_mlflow_secret_key,
    ensure_redis_password,
    ensure_request_id_key,
    write_private,
)
from control_plane.db.engine import migrate
from control_plane.deployer.local import bento_port, is_ready
from control_plane.jobs import schedule_evaluations
from control_plane.label_spill import dead_letter_lines
from control_plane.log_backlog import HttpLogBacklog
from control_plane.registry.mlflow_registry import create_store
from control_plane.settings import Settings
from control_plane.stack import programs
from control_plane.stack.prometheus_config import render_local_prometheus
from control_plane.supervisor import Supervisor
from control_plane.traffic.static import ADMIN_FILENAME, render_admin_config, render_static_config
from control_plane.traffic.user_assignment import install_plugin
from control_plane.traffic_ops import sync_router
from training.train import train_and_register

log = logging.getLogger(__name__)

STARTING_PROFILES = (("control", "control"), ("baseline", "baseline"), ("canary", "better"))


def _say(msg: str) -> None:
    print(msg, flush=True)


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s")
        time.sleep(0.5)


def _redis_up(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def gateway_answers(settings: Settings) -> bool:
    body = json.dumps({"features": [0.0] * 16}).encode()
    req = urllib.request.Request(
        f"{settings.effective_gateway_url}/predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def write_infra_configs(settings: Settings) -> None:
    """Traefik's static config, its admin router and Prometheus's config, rendered into the state directory."""

    tdir = settings.state_dir / "traefik"
    settings.traefik_dynamic_dir.mkdir(parents=True, exist_ok=True)
    write_private(
        settings.traefik_dynamic_dir / ADMIN_FILENAME, render_admin_config(ensure_api_token(settings))
    )
    (tdir / "traefik.yml").write_text(
        render_static_config(
            dynamic_dir=settings.traefik_dynamic_dir,
            gateway_host=settings.bind_host,
            gateway_port=settings.gateway_port,
            api_host=settings.bind_host,
            api_port=settings.traefik_api_port,
            access_log_path=settings.log_dir / "traefik-access.json",
            fast_proxy=settings.traefik_fast_proxy,
            access_log_mode=settings.traefik_access_log,
            read_timeout_s=settings.gateway_read_timeout_s,
            user_plugin=settings.user_assignment,
        )
    )
    if settings.user_assignment:
        install_plugin(tdir)  # Traefik runs in tdir (programs.traefik) and loads ./plugins-local
    pdir = settings.state_dir / "prometheus"
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "prometheus.yml").write_text(render_local_prometheus(settings))


def ensure_models(ctx) -> dict[str, int]:
    """Train and register the three starting versions when the registry is empty; return role -> version."""

    registry = ctx.registry
    if not registry.versions():
        _say("The registry is empty: training the starting versions (control, baseline, better candidate).")
        for alias, profile in STARTING_PROFILES:
            version = train_and_register(
                tracking_uri=ctx.settings.mlflow_tracking_uri,
                artifact_location=ctx.settings.training_artifact_location,
                model_name=ctx.settings.registered_model_name,
                profile=profile,
                progress=False,
            )
            registry.set_alias(alias, version)
            _say(f"  registered version {version} ({profile}) as {alias}")
    return {role: registry.version_for(role) for role, _ in STARTING_PROFILES}


def create_secrets(settings: Settings) -> Settings:
    """Every secret of the stack (0600 files unless given in the environment); the settings that carry them.

    The state directory itself becomes 0700: it holds these, the SQLite databases and supervisord's
    program configs (whose environments carry the Redis URL).
    """
    settings.state_dir.chmod(0o700)
    ensure_api_token(settings)
    ensure_label_token(settings)
    ensure_request_id_key(settings)
    if settings.mlflow_tracking_uri.startswith("sqlite"):  # the stack runs the MLflow server
        write_private(
            programs.mlflow_auth_config_path(settings),
            programs.mlflow_auth_config(settings, ensure_api_token(settings)),
        )
    if settings.redis_url:
        return settings
    settings = replace(settings, redis_password=ensure_redis_password(settings))
    write_private(
        programs.redis_config_path(settings), programs.redis_config(settings, settings.redis_password)
    )
    return settings


def up(settings: Settings) -> Settings:
    """Start the whole stack; returns the settings it ran with (the embedded Redis' password among them)."""

    t0 = time.monotonic()
    for d in (settings.state_dir, settings.log_dir, settings.spill_dir, settings.bentoml_home):
        Path(d).mkdir(parents=True, exist_ok=True)
    settings = create_secrets(settings)
    migrate(settings.database_url)
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        # Before the MLflow server and this process's own client: one creator, never two at once.
        create_store(settings.mlflow_tracking_uri, str(settings.mlflow_artifact_root))
    write_infra_configs(settings)

    sup = Supervisor(settings.state_dir)
    sup.start()
    base = [
        programs.traefik(settings),
        programs.control_plane(settings),
        programs.worker(settings),
        programs.scheduler(settings),
    ]
    if not settings.redis_url:
        base.insert(0, programs.redis(settings))
    if settings.mlflow_tracking_uri.startswith("sqlite"):
        base.insert(0, programs.mlflow(settings, ensure_mlflow_secret_key(settings)))
    prom = programs.prometheus(settings)
    if prom is not None and (settings.state_dir / "prometheus" / "prometheus.yml").exists():
        base.append(prom)
    for program in base:
        sup.add(program)
    _wait("Redis", lambda: _redis_up(settings.effective_redis_url), 30)
    schedule_evaluations(settings.effective_redis_url, settings.eval_interval_s, settings.harm_interval_s)

    ctx = bootstrap(settings)
    roles = ensure_models(ctx)
    ctx.traffic_store.seed_if_empty(settings.traffic_weights, roles)
    wanted = ctx.traffic_store.load().held
    _say(f"Starting Bentos for versions {wanted} ...")
    with ctx.action_lock.held("startup by recsys up"):  # the web and the worker are up already
        ctx.deployer.start_many(wanted)
        sync_router(ctx)
    _wait("the gateway", lambda: gateway_answers(settings), 60)
    _say(f"Up in {time.monotonic() - t0:.0f} s.")
    print_urls(settings)
    return settings


def print_urls(settings: Settings) -> None:
    host = settings.bind_host
    _say(
        "\n".join(
            [
                f"  gateway        http://{host}:{settings.gateway_port}/predict  /recommend  /feedback",
                f"  control plane  http://{host}:{settings.control_plane_port}/   (API under /api)",
                f"  MLflow UI      http://{host}:{settings.mlflow_port}/",
                f"  Traefik API    http://{host}:{settings.traefik_api_port}/dashboard/",
                *(
                    [f"  Prometheus     http://{host}:{settings.prometheus_port}/"]
                    if programs.prometheus(settings)
                    else []
                ),
                f"  operator token {settings.state_dir / 'api-token'}   (Traefik's API: user operator, this token)",
                f"  label token    {settings.state_dir / 'label-token'}   (POST /feedback: Bearer)",
                f"  logs           {settings.log_dir}/",
            ]
        )
    )


def down(settings: Settings) -> None:
    sup = Supervisor(settings.state_dir)
    if not sup.running():
        _say("Nothing is running.")
        return
    sup.shutdown()
    _say("Stopped.")


def status(settings: Settings) -> dict:
    """Each process, each version with role, weight and health, and the URLs."""

    sup = Supervisor(settings.state_dir)
    procs = sup.processes()
    out: dict = {
        "running": bool(procs),
        "processes": {
            n: {"state": p["statename"], "pid": p["pid"], "description": p["description"]}
            for n, p in sorted(procs.items())
        },
        "versions": [],
    }
    if procs:
        ctx = bootstrap(settings)
        assignment = ctx.traffic_store.load()
        slots = {} if assignment.empty else assignment.slots  # nothing saved yet: no role to show
        for role, slot in sorted(slots.items()):
            version = slot.version
            url = f"http://{settings.bind_host}:{bento_port(settings, version)}" if version else None
            healthy = bool(url and is_ready(url))
            out["versions"].append(
                {
                    "role": role,
                    "version": version,
                    "weight": slot.weight,
                    "healthy": healthy,
                    "url": url,
                    "log": _log_state(url) if healthy else None,
                }
            )
        ctx.engine.dispose()
    out["dead_letter_rows"] = dead_letter_lines(settings.spill_dir)
    return out


def _log_state(url: str) -> dict | None:
    """What `recsys status` shows of a Bento's prediction log: rows lost, spilled, set aside; disk and database."""

    try:
        state = HttpLogBacklog(timeout_s=2.0).state(url)
    except (OSError, ValueError):
        return None
    keys = ("rows_lost", "rows_rejected", "rows_corrupt", "spill_rows", "db_up", "disk_ok")
    return {k: state[k] for k in keys if k in state}
