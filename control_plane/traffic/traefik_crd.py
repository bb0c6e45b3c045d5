"""TrafficRouter over Traefik's Kubernetes CRD provider: the weighted TraefikService is the state.

The TraefikService `recsys-split` lists the versions' Services with their weights and names, in an
annotation, which version holds which role; one merge patch carrying the resourceVersion it read changes
both at once, so a promotion's swap is atomic and a concurrent writer gets a conflict, not a lost update.
The IngressRoute `recsys-role-overrides` (X-Model-Role: <role>) is derived from it and patched after it
when the roles move; the TraefikService `recsys-mirror` mirrors a share of requests to a shadow version.

With `user_assignment`, the Middleware `recsys-user-assign` (the `userassign` local plugin, docs/users.md)
is patched with the same weights just before the split, and the split carries Traefik's sticky cookie.
Patched first, a rollback sends the canary's users to the baseline's child while it still exists, and a
raise names the canary's child, which already has weight; either way no user leaves the canary early.
Without it every write removes the sticky cookie from the split, so a Middleware left at old weights
(infra/k8s routes requests with X-User-Id through it) names a child the split no longer honours.
infra/k8s ships the Middleware and Traefik's plugin (docs/kubernetes.md), and RECSYS_USER_ASSIGNMENT
(on by default, as in every shape) chooses it; a router built without the setting leaves it off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from control_plane.deployer.k8s_objects import BENTO_PORT, version_name, version_url
from control_plane.k8s_client import MERGE_PATCH, KubeClients, status_of
from control_plane.traffic.base import (
    ROLES,
    Backend,
    Mirror,
    TrafficStateUnreadable,
    check_assignment,
    merge_backends,
    validate_weights,
)
from control_plane.traffic.traefik_file import (
    BODY_LIMIT_MIDDLEWARE,
    PREDICTION_PATHS_RULE,
    ROLE_HEADER,
    ROLE_OVERRIDE_PRIORITY,
    ROUTE_OVERRIDE_MIDDLEWARE,
    SPLIT_SERVICE,
    USER_ASSIGN_MIDDLEWARE,
)
from control_plane.traffic.user_assignment import STICKY_COOKIE, plugin_config

TRAEFIK = ("traefik.io", "v1alpha1")
TRAEFIK_SERVICES, INGRESS_ROUTES, MIDDLEWARES = "traefikservices", "ingressroutes", "middlewares"
ROLES_ANNOTATION = "recsys.io/roles"
ROLE_ROUTES = "recsys-role-overrides"
MIRROR_SERVICE = "recsys-mirror"
# The weighted split's sticky cookie, which the plugin writes into a request naming a user's child.
STICKY = {"cookie": {"name": STICKY_COOKIE, "httpOnly": True, "sameSite": "lax"}}
WRITE_ATTEMPTS = 3  # reads again after a conflict (another writer's resourceVersion), then gives up


class TrafficWriteConflict(RuntimeError):
    """The TraefikService kept changing under this writer; nothing of this write was put in force."""


def format_roles(backends: Mapping[str, Backend]) -> str:
    return ",".join(f"{role}={backends[role].version}" for role in ROLES if role in backends)


def parse_roles(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, text.split(",")):
        role, _, version = part.partition("=")
        if role not in ROLES or not version.isdigit():
            raise TrafficStateUnreadable(f"annotation {ROLES_ANNOTATION} has a bad entry {part!r}")
        out[role] = int(version)
    return out


class TraefikCrdRouter:
    """Keeps role assignments and weights in the TraefikService `recsys-split` of one namespace."""

    def __init__(self, clients: KubeClients, namespace: str, *, user_assignment: bool = False):
        self.clients = clients
        self.namespace = namespace
        self.user_assignment = user_assignment

    # -- reads ----------------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, int]:
        return self._state(self._get(TRAEFIK_SERVICES, SPLIT_SERVICE))[1]

    def get_backends(self) -> dict[str, Backend]:
        return self._state(self._get(TRAEFIK_SERVICES, SPLIT_SERVICE))[0]

    def get_mirror(self) -> Mirror | None:
        mirrors = self._get(TRAEFIK_SERVICES, MIRROR_SERVICE)["spec"]["mirroring"].get("mirrors") or []
        if not mirrors:
            return None
        name = mirrors[0]["name"]
        return Mirror(version=int(name.removeprefix("bento-v")), percent=int(mirrors[0].get("percent", 0)))

    # -- writes ---------------------------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, int]) -> None:
        self._write({}, validate_weights(weights))

    def set_backends(self, backends: Mapping[str, Backend | None]) -> None:
        self._write(backends, None)

    def apply(self, backends: Mapping[str, Backend | None], weights: Mapping[str, int]) -> None:
        self._write(backends, validate_weights(weights))

    def set_mirror(self, mirror: Mirror | None) -> None:
        """Copy `percent` of the gateway's requests to a version (answers discarded), or stop mirroring."""
        mirrors = (
            []
            if mirror is None
            else [{"name": version_name(mirror.version), "port": BENTO_PORT, "percent": mirror.percent}]
        )
        self._patch(TRAEFIK_SERVICES, MIRROR_SERVICE, {"spec": {"mirroring": {"mirrors": mirrors}}})

    def release(self, version: int) -> None:
        """Stop mirroring to `version` if the mirror names it: a mirror naming a removed Service would
        take the gateway's route (which passes through the mirroring service) down with it."""
        try:
            mirror = self.get_mirror()
        except TrafficStateUnreadable:
            return  # no mirroring service, so nothing mirrors to it
        if mirror is not None and mirror.version == version:
            self.set_mirror(None)

    def _write(self, update: Mapping[str, Backend | None], weights: dict[str, int] | None) -> None:
        for _ in range(WRITE_ATTEMPTS):
            found = self._get(TRAEFIK_SERVICES, SPLIT_SERVICE)
            current, current_weights = self._state(found)
            backends = merge_backends(current, update)
            new_weights = current_weights if weights is None else weights
            check_assignment(new_weights, backends)
            if backends == current and new_weights == current_weights:
                return  # unchanged: spare Traefik a reload
            patch = {
                "metadata": {
                    "resourceVersion": found["metadata"]["resourceVersion"],
                    "annotations": {ROLES_ANNOTATION: format_roles(backends)},
                },
                "spec": {"weighted": {"services": split_services(backends, new_weights)}},
            }
            # null removes the key (a merge patch): off, the split ignores whatever cookie a request has
            patch["spec"]["weighted"]["sticky"] = STICKY if self.user_assignment else None
            if self.user_assignment:
                self._patch(
                    MIDDLEWARES,
                    USER_ASSIGN_MIDDLEWARE,
                    {"spec": {"plugin": user_plugin(self.namespace, backends, new_weights)}},
                )
            try:
                self._patch(TRAEFIK_SERVICES, SPLIT_SERVICE, patch)
            except self.clients.error as exc:
                if status_of(exc) == 409:
                    continue  # another writer got there first: read its state and apply ours over it
                raise
            if _versions(backends) != _versions(current):
                self._patch(INGRESS_ROUTES, ROLE_ROUTES, {"spec": {"routes": role_routes(backends)}})
            return
        raise TrafficWriteConflict(
            f"TraefikService {SPLIT_SERVICE} changed under {WRITE_ATTEMPTS} attempts to write it; try again"
        )

    # -- the API --------------------------------------------------------------------------------------

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        try:
            return self.clients.custom.get_namespaced_custom_object(*TRAEFIK, self.namespace, plural, name)
        except self.clients.error as exc:
            if status_of(exc) == 404:
                raise TrafficStateUnreadable(
                    f"{plural} {self.namespace}/{name} does not exist; apply infra/k8s first"
                ) from exc
            raise

    def _patch(self, plural: str, name: str, body: dict[str, Any]) -> None:
        self.clients.custom.patch_namespaced_custom_object(
            *TRAEFIK, self.namespace, plural, name, body, _content_type=MERGE_PATCH
        )

    def _state(self, found: Mapping[str, Any]) -> tuple[dict[str, Backend], dict[str, int]]:
        try:
            roles = parse_roles((found["metadata"].get("annotations") or {}).get(ROLES_ANNOTATION, ""))
            split = {
                e["name"]: int(e.get("weight", 0)) for e in found["spec"]["weighted"].get("services") or []
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise TrafficStateUnreadable(f"cannot read TraefikService {SPLIT_SERVICE}: {exc}") from exc
        backends = {role: Backend(version=v, url=version_url(self.namespace, v)) for role, v in roles.items()}
        weights = {role: split.get(version_name(roles[role]), 0) if role in roles else 0 for role in ROLES}
        return backends, weights


def split_services(backends: Mapping[str, Backend], weights: Mapping[str, int]) -> list[dict[str, Any]]:
    """The weighted service's children: each role's version, in role order, with the role's weight."""
    return [
        {"name": version_name(backends[role].version), "port": BENTO_PORT, "weight": weights.get(role, 0)}
        for role in ROLES
        if role in backends
    ]


def child_name(namespace: str, version: int) -> str:
    """The name Traefik's CRD provider gives a weighted child Service (its fullServiceName): namespace,
    Service and port, each run of other characters a dash; its sticky cookie is a hash of it."""
    return "-".join(
        filter(None, re.split(r"[^0-9A-Za-z]+", f"{namespace}-{version_name(version)}-{BENTO_PORT}"))
    )


def user_plugin(
    namespace: str, backends: Mapping[str, Backend], weights: Mapping[str, int]
) -> dict[str, Any]:
    """The Middleware's `plugin` block for these weights (as the file router renders it)."""
    return plugin_config({role: child_name(namespace, b.version) for role, b in backends.items()}, weights)


def role_routes(backends: Mapping[str, Backend]) -> list[dict[str, Any]]:
    """A tester's `X-Model-Role: <role>` reaches the role's version past the weights."""
    return [
        {
            "kind": "Rule",
            "match": f"({PREDICTION_PATHS_RULE}) && Header(`{ROLE_HEADER}`, `{role}`)",
            "priority": ROLE_OVERRIDE_PRIORITY,
            "middlewares": [{"name": ROUTE_OVERRIDE_MIDDLEWARE}, {"name": BODY_LIMIT_MIDDLEWARE}],
            "services": [{"name": version_name(backends[role].version), "port": BENTO_PORT}],
        }
        for role in ROLES
        if role in backends
    ]


def _versions(backends: Mapping[str, Backend]) -> dict[str, int]:
    return {role: b.version for role, b in backends.items()}
