"""A model version's Kubernetes objects as plain dicts: what KubernetesDeployer creates, and infra/k8s shows.

Pure: no client, no I/O. The per-version files under infra/k8s are rendered from these functions
(infra/k8s/render_versions.py) and a test keeps them equal, so the deployer and the manifests cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from control_plane.traffic.traefik_file import (
    BODY_LIMIT_MIDDLEWARE,
    PREDICTION_PATHS_RULE,
    ROUTE_OVERRIDE_MIDDLEWARE,
    VERSION_HEADER,
    VERSION_OVERRIDE_PRIORITY,
)

BENTO_PORT = 3000
APP_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
BENTO_APP = "recsys-bento"
VERSION_LABEL = "recsys.io/model-version"
# The Secret every password and token lives in (docs/kubernetes.md: created with kubectl, never committed).
SECRET_NAME = "recsys-secrets"
DATABASE_URL_KEY = "database-url"

# Requests and limits from what one Bento was measured to use (docs/performance.md): one worker served
# 9,916 /predict a second directly at 101 µs of CPU each, which is one core; its arbiter, worker and log
# writer held 364-380 MB RSS after the runs, and STACK-NOTES saw up to 510 MB under load.
CPU_REQUEST = "1"
CPU_LIMIT = "2"  # the worker and the log's writer process can both run at once
MEMORY_REQUEST = "400Mi"
MEMORY_LIMIT = "640Mi"
# Scale out before the worker's core is saturated: the tail grows long before throughput stops.
HPA_CPU_UTILIZATION_PERCENT = 70
# KEDA's alternative target: requests a second per replica, half of one Bento's measured ceiling.
KEDA_REQUESTS_PER_REPLICA = 5000
KEDA_PROMETHEUS_URL = "http://prometheus.monitoring.svc:9090"

DEPLOYMENT, SERVICE, PDB, HPA, SCALED_OBJECT, INGRESS_ROUTE = (
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ScaledObject",
    "IngressRoute",
)


@dataclass(frozen=True)
class BentoShape:
    """What every version's objects share: where they live, the image repository, how they scale."""

    namespace: str = "recsys"
    image_repository: str = "recsys-bento"
    autoscaler: str = "hpa"  # or "keda"
    min_replicas: int = 2
    max_replicas: int = 10


@dataclass(frozen=True)
class KubeObject:
    """One object to create: its kind (which API takes it) and its body."""

    kind: str
    body: dict[str, Any]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]


def version_name(version: int) -> str:
    """The Deployment, Service, autoscaler, budget and override route of a version share this name."""
    return f"bento-v{version}"


def version_url(namespace: str, version: int) -> str:
    return f"http://{version_name(version)}.{namespace}.svc:{BENTO_PORT}"


def version_labels(version: int) -> dict[str, str]:
    return {APP_LABEL: BENTO_APP, PART_OF_LABEL: "recsys-canary", VERSION_LABEL: str(version)}


def _meta(version: int, shape: BentoShape) -> dict[str, Any]:
    return {"name": version_name(version), "namespace": shape.namespace, "labels": version_labels(version)}


def deployment(version: int, shape: BentoShape) -> dict[str, Any]:
    """The version's Bento image, pinned by tag (never latest), probed on /healthz and /readyz."""
    selector = {APP_LABEL: BENTO_APP, VERSION_LABEL: str(version)}
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2, "timeoutSeconds": 2}
    return {
        "apiVersion": "apps/v1",
        "kind": DEPLOYMENT,
        "metadata": _meta(version, shape),
        "spec": {
            "replicas": shape.min_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": version_labels(version)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
                    "containers": [
                        {
                            "name": "bento",
                            "image": f"{shape.image_repository}:v{version}",
                            "imagePullPolicy": "IfNotPresent",
                            "ports": [{"name": "http", "containerPort": BENTO_PORT}],
                            "env": [
                                {
                                    "name": "DATABASE_URL",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": SECRET_NAME, "key": DATABASE_URL_KEY}
                                    },
                                },
                                {"name": "BENTOML_DO_NOT_TRACK", "value": "true"},
                                {"name": "RECSYS_SPILL_DIR", "value": "/var/lib/recsys/spill"},
                                # Under BENTOML_HOME by default, which the read-only root cannot hold.
                                {"name": "RECSYS_PROMETHEUS_DIR", "value": "/tmp/prometheus"},
                            ],
                            "readinessProbe": probe,
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 10,
                                "timeoutSeconds": 3,
                                "failureThreshold": 3,
                            },
                            # About 3 s to /readyz alone, 15 s with seven starting on two cores (STACK-NOTES).
                            "startupProbe": {**probe, "failureThreshold": 60},
                            "resources": {
                                "requests": {"cpu": CPU_REQUEST, "memory": MEMORY_REQUEST},
                                "limits": {"cpu": CPU_LIMIT, "memory": MEMORY_LIMIT},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            # Rows the database did not take are spilled here and replayed (bentos/predlog.py).
                            "volumeMounts": [
                                {"name": "spill", "mountPath": "/var/lib/recsys/spill"},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [{"name": "spill", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def service(version: int, shape: BentoShape) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": SERVICE,
        "metadata": _meta(version, shape),
        "spec": {
            "selector": {APP_LABEL: BENTO_APP, VERSION_LABEL: str(version)},
            "ports": [{"name": "http", "port": BENTO_PORT, "targetPort": "http"}],
        },
    }


def disruption_budget(version: int, shape: BentoShape) -> dict[str, Any]:
    """A node drain takes at most one of a version's replicas at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": PDB,
        "metadata": _meta(version, shape),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {APP_LABEL: BENTO_APP, VERSION_LABEL: str(version)}},
        },
    }


def autoscaler(version: int, shape: BentoShape) -> dict[str, Any]:
    """An HPA on CPU, or KEDA's ScaledObject on the request rate Prometheus has; minimum = the floor."""
    target = {"apiVersion": "apps/v1", "kind": DEPLOYMENT, "name": version_name(version)}
    if shape.autoscaler == "keda":
        # pod_model_version: the scrape configuration copies the pod's version label onto its series.
        query = (
            f'sum(rate(bentoml_service_request_total{{namespace="{shape.namespace}",'
            f'pod_model_version="{version}"}}[1m]))'
        )
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": SCALED_OBJECT,
            "metadata": _meta(version, shape),
            "spec": {
                "scaleTargetRef": {"name": version_name(version)},
                "minReplicaCount": shape.min_replicas,
                "maxReplicaCount": shape.max_replicas,
                "triggers": [
                    {
                        "type": "prometheus",
                        "metadata": {
                            "serverAddress": KEDA_PROMETHEUS_URL,
                            "query": query,
                            "threshold": str(KEDA_REQUESTS_PER_REPLICA),
                        },
                    }
                ],
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": HPA,
        "metadata": _meta(version, shape),
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": shape.min_replicas,
            "maxReplicas": shape.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": HPA_CPU_UTILIZATION_PERCENT},
                    },
                }
            ],
        },
    }


def override_route(version: int, shape: BentoShape) -> dict[str, Any]:
    """`X-Model-Version: N` reaches version N past the weights (logged as route=override)."""
    return {
        "apiVersion": "traefik.io/v1alpha1",
        "kind": INGRESS_ROUTE,
        "metadata": _meta(version, shape),
        "spec": {
            "entryPoints": ["web"],
            "routes": [
                {
                    "kind": "Rule",
                    "match": f"({PREDICTION_PATHS_RULE}) && Header(`{VERSION_HEADER}`, `{version}`)",
                    "priority": VERSION_OVERRIDE_PRIORITY,
                    "middlewares": [{"name": ROUTE_OVERRIDE_MIDDLEWARE}, {"name": BODY_LIMIT_MIDDLEWARE}],
                    "services": [{"name": version_name(version), "port": BENTO_PORT}],
                }
            ],
        },
    }


def version_objects(version: int, shape: BentoShape) -> list[KubeObject]:
    """Everything one version needs, in the order it is created (and the reverse of its removal)."""
    return [
        KubeObject(SERVICE, service(version, shape)),
        KubeObject(DEPLOYMENT, deployment(version, shape)),
        KubeObject(PDB, disruption_budget(version, shape)),
        KubeObject(SCALED_OBJECT if shape.autoscaler == "keda" else HPA, autoscaler(version, shape)),
        KubeObject(INGRESS_ROUTE, override_route(version, shape)),
    ]


# The seed versions infra/k8s ships (1 control, 2 baseline, 3 canary, as in docker-compose.yml).
SEED_VERSIONS = (1, 2, 3)
_AUTOSCALER_KINDS = (HPA, SCALED_OBJECT)


def manifest_text(shape: BentoShape, versions=SEED_VERSIONS, autoscalers: bool = False) -> str:
    """YAML of the versions' objects: all but the autoscalers (base), or only the autoscalers (overlays)."""
    docs = [
        obj.body
        for v in versions
        for obj in version_objects(v, shape)
        if (obj.kind in _AUTOSCALER_KINDS) == autoscalers
    ]
    header = (
        "# Rendered from control_plane/deployer/k8s_objects.py by infra/k8s/render_versions.py: do not edit;\n"
        "# the deployer creates the same objects for every new version, and a test keeps the two equal.\n"
    )
    return header + yaml.safe_dump_all(docs, sort_keys=False, width=1000)
