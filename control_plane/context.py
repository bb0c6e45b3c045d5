"""The service layer's dependencies, bundled; `bootstrap` wires the real ones in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import Engine

from control_plane.action_lock import ActionLock
from control_plane.db.engine import make_engine
from control_plane.deployer.base import Deployer
from control_plane.ledger import Ledger
from control_plane.log_backlog import HttpLogBacklog, LogBacklog
from control_plane.registry.base import ModelRegistry
from control_plane.registry.mlflow_registry import MlflowRegistry
from control_plane.settings import Settings
from control_plane.traffic.base import TrafficRouter
from control_plane.traffic.store import TrafficStore
from control_plane.traffic.traefik_file import GatewayOptions, TraefikFileRouter


def no_fault(point: str) -> None:
    """A named point in an action (e.g. AFTER_TRAFFIC_WRITE) where a test may make the process die."""


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
    # Called at named points of an action; only tests pass another (tests/fault_worker.py kills a worker
    # between the Traefik write and the MLflow alias move with it).
    fault_point: Callable[[str], None] = no_fault
    ledger: Ledger = field(init=False)
    traffic_store: TrafficStore = field(init=False)
    action_lock: ActionLock = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = Ledger(self.engine)
        self.traffic_store = TrafficStore(self.engine)
        self.action_lock = ActionLock(self.engine, wait_s=self.settings.action_wait_s)


def bootstrap(settings: Settings | None = None) -> Context:
    """Build the real Context from settings: database, MLflow registry, Traefik file, deployer."""
    settings = settings or Settings.from_env()
    engine = make_engine(settings.database_url)
    registry = MlflowRegistry(settings.mlflow_tracking_uri, settings.registered_model_name)
    if settings.deployer == "kubernetes":
        router, deployer = kubernetes_parts(settings)
        return Context(settings=settings, engine=engine, registry=registry, router=router, deployer=deployer)
    return Context(
        settings=settings,
        engine=engine,
        registry=registry,
        router=TraefikFileRouter(
            settings.traefik_dynamic_dir,
            options=GatewayOptions(
                control_plane_url=settings.effective_control_plane_url,
                max_body_bytes=settings.max_body_bytes,
                label_rate_per_s=settings.label_rate_per_s,
                label_burst=settings.label_burst,
                user_assignment=settings.user_assignment,
            ),
        ),
        deployer=_deployer(settings),
    )


def _deployer(settings: Settings) -> Deployer:
    """Containers through the Docker gate, fixed endpoints (Kubernetes), or local processes."""
    if settings.docker_host:
        # lazy: bootstrap wires one deployer of four; the Docker one adds 45 ms of import (its gate's)
        from control_plane.deployer.docker import DockerDeployer

        return DockerDeployer(settings)
    if settings.bento_urls:
        # lazy: bootstrap wires one deployer of four; the fixed one adds 11 ms of import
        from control_plane.deployer.fixed import FixedDeployer

        return FixedDeployer(settings.bento_urls)
    # lazy: bootstrap wires one deployer of four; the local one adds 20 ms of import (Bento build, supervisor)
    from control_plane.deployer.local import LocalDeployer
    from control_plane.stack.prometheus_config import write_bento_targets

    return LocalDeployer(settings, on_endpoints=partial(write_bento_targets, settings))


def kubernetes_parts(settings: Settings, clients=None) -> tuple[TrafficRouter, Deployer]:
    """Traefik's CRD provider and a Deployment per version, with replica floors that follow the split."""
    # The client itself is imported only in kube_clients (the optional [k8s] extra: k8s_client.py says why).
    # lazy: only RECSYS_DEPLOYER=kubernetes uses these; 16 ms of import for every other process
    from control_plane.deployer.k8s_objects import BentoShape
    from control_plane.deployer.kubernetes import KubernetesDeployer
    from control_plane.k8s_client import kube_clients
    from control_plane.traffic.scaling_router import ScalingRouter
    from control_plane.traffic.traefik_crd import TraefikCrdRouter

    clients = clients or kube_clients()
    shape = BentoShape(
        namespace=settings.k8s_namespace,
        image_repository=settings.k8s_bento_image,
        autoscaler=settings.k8s_autoscaler,
        min_replicas=settings.k8s_min_replicas,
        max_replicas=settings.k8s_max_replicas,
    )
    crd_router = TraefikCrdRouter(clients, settings.k8s_namespace, user_assignment=settings.user_assignment)
    deployer = KubernetesDeployer(
        clients,
        shape,
        ready_timeout_s=settings.k8s_ready_timeout_s,
        before_undeploy=crd_router.release,  # no mirror is left naming a removed version
    )
    router = ScalingRouter(
        crd_router,
        deployer,
        min_replicas=settings.k8s_min_replicas,
        max_replicas=settings.k8s_max_replicas,
    )
    return router, deployer
