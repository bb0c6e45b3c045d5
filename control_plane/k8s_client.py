"""The official Kubernetes client's API objects, bundled; built only when RECSYS_DEPLOYER=kubernetes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class KubeClients:
    """The APIs the deployer and the Traefik CRD router call, and the error class they raise.

    Typed loosely on purpose: the unit tests pass a recording fake with the same methods
    (tests/k8s_fake.py), so no Kubernetes type crosses the deployer and router interfaces.
    """

    apps: Any  # AppsV1Api
    core: Any  # CoreV1Api
    policy: Any  # PolicyV1Api
    autoscaling: Any  # AutoscalingV2Api
    custom: Any  # CustomObjectsApi
    error: type[Exception]  # kubernetes.client.exceptions.ApiException (it has .status)


def kube_clients(host: str | None = None) -> KubeClients:
    """In-cluster credentials (the control plane's ServiceAccount), else the local kubeconfig; or `host`."""
    # Imported here and not at the top: the client is the optional [k8s] extra, needed only by a control
    # plane that runs on Kubernetes, and importing it costs every other process about half a second.
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    if host is not None:  # an API server without credentials (the tests' fake)
        api = client.ApiClient(client.Configuration(host=host))
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.ApiClient()
    return KubeClients(
        apps=client.AppsV1Api(api),
        core=client.CoreV1Api(api),
        policy=client.PolicyV1Api(api),
        autoscaling=client.AutoscalingV2Api(api),
        custom=client.CustomObjectsApi(api),
        error=ApiException,
    )


def status_of(exc: Exception) -> int | None:
    """The HTTP status an API error carries (404 missing, 409 exists or stale resourceVersion)."""
    return getattr(exc, "status", None)
