"""The service layer's dependencies, bundled; `bootstrap` wires the real ones in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from control_plane.action_lock import ActionLock
from control_plane.deployer.base import Deployer
from control_plane.ledger import Ledger
from control_plane.log_backlog import HttpLogBacklog, LogBacklog
from control_plane.registry.base import ModelRegistry
from control_plane.settings import Settings
from control_plane.traffic.base import TrafficRouter
from control_plane.traffic.store import TrafficStore


@dataclass
class Context:
    """Everything a service function needs; views, jobs and the CLI all pass one of these."""

    settings: Settings
    engine: Engine
    registry: ModelRegistry
    router: TrafficRouter
    deployer: Deployer
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    drain_s: float = 3.0
    log_backlog: LogBacklog = field(default_factory=HttpLogBacklog)  # rows the Bentos have yet to replay
    ledger: Ledger = field(init=False)
    traffic_store: TrafficStore = field(init=False)
    action_lock: ActionLock = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.engine)
        self.traffic_store = TrafficStore(self.engine)
        self.action_lock = ActionLock(self.engine, wait_s=self.settings.action_wait_s)


def bootstrap(settings: Settings | None = None) -> Context:
    """Build the real Context from settings: database, MLflow registry, Traefik file, deployer."""
    from control_plane.db.engine import make_engine
    from control_plane.registry.mlflow_registry import MlflowRegistry
    from control_plane.traffic.traefik_file import TraefikFileRouter

    settings = settings or Settings.from_env()
    engine = make_engine(settings.database_url)
    return Context(
        settings=settings,
        engine=engine,
        registry=MlflowRegistry(settings.mlflow_tracking_uri, settings.registered_model_name),
        router=TraefikFileRouter(
            settings.traefik_dynamic_dir,
            control_plane_url=settings.effective_control_plane_url,
            max_body_bytes=settings.max_body_bytes,
        ),
        deployer=_deployer(settings),
    )


def _deployer(settings: Settings) -> Deployer:
    """Containers through the Docker gate, fixed endpoints (Kubernetes), or local processes."""
    if settings.docker_host:
        from control_plane.deployer.docker import DockerDeployer

        return DockerDeployer(settings)
    if settings.bento_urls:
        from control_plane.deployer.fixed import FixedDeployer

        return FixedDeployer(settings.bento_urls)
    from control_plane.deployer.local import LocalDeployer

    return LocalDeployer(settings)
