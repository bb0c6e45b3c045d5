"""Kubernetes: a Deployment, Service, disruption budget, autoscaler and override route per model version."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from control_plane.deployer.k8s_objects import (
    APP_LABEL,
    BENTO_APP,
    DEPLOYMENT,
    HPA,
    INGRESS_ROUTE,
    PDB,
    SCALED_OBJECT,
    SERVICE,
    VERSION_LABEL,
    BentoShape,
    KubeObject,
    version_name,
    version_objects,
    version_url,
)
from control_plane.errors import DeployFailed
from control_plane.k8s_client import MERGE_PATCH, KubeClients, status_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Api:
    """Which client object and method names handle one kind; custom resources name their group too."""

    client: str
    typed: str = ""  # e.g. "namespaced_deployment" -> create_namespaced_deployment, ...
    custom: tuple[str, str, str] | None = None  # (group, version, plural)

    def call(self, clients: KubeClients, verb: str, namespace: str, name: str, body=None) -> Any:
        api = getattr(clients, self.client)
        if self.custom is not None:
            group, version, plural = self.custom
            method = getattr(api, f"{verb}_namespaced_custom_object")
            args: tuple = (group, version, namespace, plural)
            if verb == "create":
                return method(*args, body)
            if verb == "patch":
                return method(*args, name, body, _content_type=MERGE_PATCH)
            return method(*args, name)
        method = getattr(api, f"{verb}_{self.typed}")
        if verb == "create":
            return method(namespace, body)
        if verb == "patch":
            # A dict body would otherwise be sent as a JSON patch (the client's first content type).
            return method(name, namespace, body, _content_type=MERGE_PATCH)
        return method(name, namespace)


APIS = {
    SERVICE: _Api("core", "namespaced_service"),
    DEPLOYMENT: _Api("apps", "namespaced_deployment"),
    PDB: _Api("policy", "namespaced_pod_disruption_budget"),
    HPA: _Api("autoscaling", "namespaced_horizontal_pod_autoscaler"),
    SCALED_OBJECT: _Api("custom", custom=("keda.sh", "v1alpha1", "scaledobjects")),
    INGRESS_ROUTE: _Api("custom", custom=("traefik.io", "v1alpha1", "ingressroutes")),
}
# What a re-deploy of a running version must not reset: the replicas and floors the scaler has set.
_SCALING_FIELDS = ("replicas", "minReplicas", "minReplicaCount")


class KubernetesDeployer:
    """Creates a version's objects, waits for a ready replica, removes them; also the rollout's scaler."""

    def __init__(
        self,
        clients: KubeClients,
        shape: BentoShape,
        *,
        ready_timeout_s: float = 300.0,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        before_undeploy: Callable[[int], None] = lambda version: None,
    ):
        self.clients = clients
        self.before_undeploy = before_undeploy  # e.g. the router letting go of the version first
        self.shape = shape
        self.ready_timeout_s = ready_timeout_s
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep

    # -- the Deployer interface ---------------------------------------------------------------------

    def deploy(self, version: int) -> str:
        for obj in version_objects(version, self.shape):
            self._create_or_update(obj)
        try:
            self.wait_ready(version, 1)
        except DeployFailed:
            self.undeploy(version)
            raise
        log.info("deployed", extra={"version": version, "namespace": self.shape.namespace})
        return version_url(self.shape.namespace, version)

    def start_many(self, versions: list[int]) -> dict[int, str]:
        return {v: self.deploy(v) for v in versions}

    def undeploy(self, version: int) -> None:
        """Remove what deploy created, the route first so that no request is sent to a going pod."""
        self.before_undeploy(version)
        for obj in reversed(version_objects(version, self.shape)):
            try:
                APIS[obj.kind].call(self.clients, "delete", self.shape.namespace, obj.name)
            except self.clients.error as exc:
                if status_of(exc) != 404:
                    raise

    def endpoints(self) -> dict[int, str]:
        found = self.clients.apps.list_namespaced_deployment(
            self.shape.namespace, label_selector=f"{APP_LABEL}={BENTO_APP}"
        )
        versions = sorted(int(d.metadata.labels[VERSION_LABEL]) for d in found.items)
        return {v: version_url(self.shape.namespace, v) for v in versions}

    # -- the scaler the ScalingRouter drives (control_plane/traffic/scaling_router.py) ----------------

    def ready_replicas(self, version: int) -> int:
        """0 for a version without a Deployment (the seed routing may name one never deployed)."""
        try:
            status = self._status(version).status
        except self.clients.error as exc:
            if status_of(exc) != 404:
                raise
            return 0
        return (status.ready_replicas or 0) if status else 0

    def set_floor(self, version: int, replicas: int) -> None:
        """The autoscaler may not go below `replicas`, and the Deployment is raised to it now."""
        name = version_name(version)
        kind, field = (
            (SCALED_OBJECT, "minReplicaCount") if self.shape.autoscaler == "keda" else (HPA, "minReplicas")
        )
        try:
            APIS[kind].call(self.clients, "patch", self.shape.namespace, name, {"spec": {field: replicas}})
        except self.clients.error as exc:
            if status_of(exc) != 404:
                raise
            return  # not deployed (or removed meanwhile): nothing to hold up
        # The autoscaler would raise it on its next sync (15 s); a promotion waits for it, so do it now.
        if (self._status(version).spec.replicas or 0) < replicas:
            self.clients.apps.patch_namespaced_deployment_scale(
                name, self.shape.namespace, {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH
            )

    def wait_ready(self, version: int, replicas: int) -> None:
        """Until `replicas` pods of the version's current generation answer /readyz, or DeployFailed."""
        deadline = self.clock() + self.ready_timeout_s
        while True:
            found = self._status(version)
            status = found.status
            ready = (status.ready_replicas or 0) if status else 0
            current = status is not None and (status.observed_generation or 0) >= (
                found.metadata.generation or 0
            )
            if current and ready >= replicas:
                return
            if self.clock() > deadline:
                why = "; ".join(c.message for c in (status.conditions or []) if c.message) if status else ""
                raise DeployFailed(
                    f"version {version} had {ready} of {replicas} replicas ready after "
                    f"{self.ready_timeout_s:.0f} s" + (f" ({why})" if why else "")
                )
            self.sleep(self.poll_s)

    # -- helpers --------------------------------------------------------------------------------------

    def _status(self, version: int) -> Any:
        return self.clients.apps.read_namespaced_deployment_status(
            version_name(version), self.shape.namespace
        )

    def _create_or_update(self, obj: KubeObject) -> None:
        api = APIS[obj.kind]
        try:
            api.call(self.clients, "create", self.shape.namespace, obj.name, obj.body)
        except self.clients.error as exc:
            if status_of(exc) != 409:
                raise DeployFailed(f"could not create {obj.kind} {obj.name}: {exc}") from exc
            # Already there (a re-deploy, or a previous baseline restored): bring it to this shape,
            # keeping the replicas and floors it runs at.
            spec = {k: v for k, v in obj.body["spec"].items() if k not in _SCALING_FIELDS}
            api.call(self.clients, "patch", self.shape.namespace, obj.name, {**obj.body, "spec": spec})
