"""A fake Kubernetes API: the client calls the deployer and the Traefik CRD router make, on dicts, recorded.

Each call is recorded as the (API group, resource, verb) a Role must grant for it, with its name and body.
Patches are JSON merge patches (RFC 7386) and must say so, as the real API server would insist; a patch
carrying a stale metadata.resourceVersion gets 409, like the server's optimistic concurrency; a
Deployment's pods become ready one per status read (none for a version in `never_ready`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from control_plane.k8s_client import MERGE_PATCH, KubeClients

KINDS = {  # kind -> (API group, resource)
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh", "scaledobjects"),
    "IngressRoute": ("traefik.io", "ingressroutes"),
    "TraefikService": ("traefik.io", "traefikservices"),
    "Middleware": ("traefik.io", "middlewares"),
}


class _Response:
    """What the client deserializes a server's answer from."""

    def __init__(self, body: Any):
        self.data = json.dumps(body)


def as_model(body: Any, type_name: str) -> Any:
    """The client's own model object (V1Deployment, ...) for a body, as the real API call returns it."""
    return ApiClient().deserialize(_Response(body), type_name)


@dataclass(frozen=True)
class Call:
    group: str
    resource: str
    verb: str
    name: str = ""
    body: Any = None

    @property
    def permission(self) -> tuple[str, str, str]:
        return (self.group, self.resource, self.verb)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@dataclass
class FakeCluster:
    namespace: str = "recsys"
    never_ready: set[int] = field(default_factory=set)
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (resource, name) -> body
    calls: list[Call] = field(default_factory=list)
    _rv: int = 0

    def clients(self) -> KubeClients:
        return KubeClients(
            apps=_Apps(self), core=_Typed(self, "services"), policy=_Typed(self, "poddisruptionbudgets"),
            autoscaling=_Typed(self, "horizontalpodautoscalers"), custom=_Custom(self), error=ApiException,
        )  # fmt: skip

    def load(self, path: Path) -> None:
        """Create the objects of a manifest file, as `kubectl apply` would (not recorded)."""
        for doc in yaml.safe_load_all(path.read_text()):
            self.load_object(doc)

    def load_object(self, doc: dict) -> None:
        """Create one object, as `kubectl apply` would (not recorded)."""
        self._store(KINDS[doc["kind"]][1], copy.deepcopy(doc))

    def get(self, resource: str, name: str) -> dict:
        return self.objects[(resource, name)]

    def writes(self, *resources: str) -> list[Call]:
        """Every create, patch and delete (of these resources), in order."""
        return [
            c for c in self.calls
            if c.verb in ("create", "patch", "delete") and (not resources or c.resource in resources)
        ]  # fmt: skip

    # -- what every API does --------------------------------------------------------------------------

    def record(self, group: str, resource: str, verb: str, name: str = "", body: Any = None) -> None:
        self.calls.append(Call(group, resource, verb, name, copy.deepcopy(body)))

    def _store(self, resource: str, body: dict) -> dict:
        self._rv += 1
        meta = body.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._rv)
        meta["generation"] = meta.get("generation", 0) + 1
        self.objects[(resource, meta["name"])] = body
        return body

    def create(self, group: str, resource: str, body: dict) -> dict:
        name = body["metadata"]["name"]
        self.record(group, resource, "create", name, body)
        if (resource, name) in self.objects:
            raise ApiException(status=409, reason=f"{resource} {name} already exists")
        return self._store(resource, copy.deepcopy(body))

    def read(self, group: str, resource: str, name: str, verb: str = "get") -> dict:
        self.record(group, resource, verb, name)
        base = resource.split("/")[0]
        if (base, name) not in self.objects:
            raise ApiException(status=404, reason=f"{base} {name} not found")
        return self.objects[(base, name)]

    def patch(self, group: str, resource: str, name: str, body: dict, content_type: str | None) -> dict:
        self.record(group, resource, "patch", name, body)
        if content_type != MERGE_PATCH:
            raise ApiException(status=415, reason=f"a dict body sent as {content_type}")
        base = resource.split("/")[0]
        if (base, name) not in self.objects:
            raise ApiException(status=404, reason=f"{base} {name} not found")
        current = self.objects[(base, name)]
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="the object has been modified")
        merged = merge_patch(current, body)
        merged["metadata"]["generation"] = current["metadata"]["generation"]
        if merged.get("spec") == current.get("spec"):
            merged["metadata"]["generation"] -= 1  # the spec did not change: no new generation
        return self._store(base, merged)

    def delete(self, group: str, resource: str, name: str) -> None:
        self.record(group, resource, "delete", name)
        if self.objects.pop((resource, name), None) is None:
            raise ApiException(status=404, reason=f"{resource} {name} not found")

    def deployment_status(self, name: str) -> dict:
        """One more pod ready each time the status is read, up to spec.replicas."""
        body = self.read("apps", "deployments/status", name)
        version = int(body["metadata"]["labels"]["recsys.io/model-version"])
        status = body.setdefault("status", {"readyReplicas": 0})
        wanted = body["spec"]["replicas"]
        if version not in self.never_ready:
            status["readyReplicas"] = min(wanted, status.get("readyReplicas", 0) + 1)
        status["observedGeneration"] = body["metadata"]["generation"]
        return copy.deepcopy(body)

    def list_deployments(self, label_selector: str) -> list[dict]:
        self.record("apps", "deployments", "list")
        key, _, value = label_selector.partition("=")
        return [
            copy.deepcopy(body) for (resource, _), body in sorted(self.objects.items())
            if resource == "deployments" and body["metadata"].get("labels", {}).get(key) == value
        ]  # fmt: skip

    def ready(self, version: int) -> int:
        return self.get("deployments", f"bento-v{version}").get("status", {}).get("readyReplicas", 0)


class _Typed:
    """CoreV1Api (services), PolicyV1Api, AutoscalingV2Api: create, patch, delete of one resource."""

    def __init__(self, cluster: FakeCluster, resource: str):
        self.cluster, self.resource = cluster, resource
        self.group = {"services": "", "poddisruptionbudgets": "policy"}.get(resource, "autoscaling")

    def __getattr__(self, method: str):
        verb, _, _ = method.partition("_namespaced_")
        c, group, resource = self.cluster, self.group, self.resource
        if verb == "create":
            return lambda namespace, body: c.create(group, resource, body)
        if verb == "patch":
            return lambda name, namespace, body, _content_type=None: c.patch(
                group, resource, name, body, _content_type
            )
        if verb == "delete":
            return lambda name, namespace: c.delete(group, resource, name)
        raise AttributeError(method)


class _Apps(_Typed):
    def __init__(self, cluster: FakeCluster):
        super().__init__(cluster, "deployments")
        self.group = "apps"

    def read_namespaced_deployment_status(self, name: str, namespace: str):
        return as_model(self.cluster.deployment_status(name), "V1Deployment")

    def patch_namespaced_deployment_scale(self, name, namespace, body, _content_type=None):
        return self.cluster.patch("apps", "deployments/scale", name, body, _content_type)

    def list_namespaced_deployment(self, namespace: str, label_selector: str = ""):
        return as_model({"items": self.cluster.list_deployments(label_selector)}, "V1DeploymentList")


class _Custom:
    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        return copy.deepcopy(self.cluster.create(group, plural, body))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return copy.deepcopy(self.cluster.read(group, plural, name))

    def patch_namespaced_custom_object(
        self, group, version, namespace, plural, name, body, _content_type=None
    ):
        return copy.deepcopy(self.cluster.patch(group, plural, name, body, _content_type))

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        return self.cluster.delete(group, plural, name)
