"""A TrafficRouter that moves replica floors around each weight change (control_plane/traffic/replica_floors.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from control_plane.traffic.base import (
    Backend,
    Mirror,
    TrafficRouter,
    check_assignment,
    merge_backends,
    validate_weights,
)
from control_plane.traffic.replica_floors import fleet_replicas, plan_floors, shares_by_version


class Scaler(Protocol):
    """Replica counts and floors per version (KubernetesDeployer implements it)."""

    def ready_replicas(self, version: int) -> int: ...

    def set_floor(self, version: int, replicas: int) -> None: ...

    def wait_ready(self, version: int, replicas: int) -> None:
        """Return once `replicas` are ready; raise DeployFailed at the deadline (the weights then stay)."""
        ...


class ScalingRouter:
    """Raises floors and waits for them before the write, lowers them after; the write itself is inner's."""

    def __init__(self, inner: TrafficRouter, scaler: Scaler, min_replicas: int, max_replicas: int):
        self.inner = inner
        self.scaler = scaler
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas

    def get_weights(self) -> dict[str, int]:
        return self.inner.get_weights()

    def get_backends(self) -> dict[str, Backend]:
        return self.inner.get_backends()

    def get_mirror(self) -> Mirror | None:
        return self.inner.get_mirror()

    def set_mirror(self, mirror: Mirror | None) -> None:
        self.inner.set_mirror(mirror)

    def set_weights(self, weights: Mapping[str, int]) -> None:
        self._move({}, validate_weights(weights))

    def set_backends(self, backends: Mapping[str, Backend | None]) -> None:
        self._move(backends, None)

    def apply(self, backends: Mapping[str, Backend | None], weights: Mapping[str, int]) -> None:
        self._move(backends, validate_weights(weights))

    def _move(self, update: Mapping[str, Backend | None], weights: dict[str, int] | None) -> None:
        current, current_weights = self.inner.get_backends(), self.inner.get_weights()
        backends = merge_backends(current, update)
        new_weights = current_weights if weights is None else weights
        check_assignment(new_weights, backends)  # refused before any replica is asked for
        before = shares_by_version(current, current_weights)
        after = shares_by_version(backends, new_weights)
        ready = {v: self.scaler.ready_replicas(v) for v, share in before.items() if share > 0}
        plan = plan_floors(
            before,
            after,
            fleet_replicas(ready, before),
            self.min_replicas,
            self.max_replicas,
            canary_before=_has_canary(current, current_weights),
            canary_after=_has_canary(backends, new_weights),
        )
        for version, replicas in plan.raise_first.items():
            self.scaler.set_floor(version, replicas)
        for version, replicas in plan.raise_first.items():
            self.scaler.wait_ready(version, replicas)
        self.inner.apply(update, new_weights)
        for version, replicas in plan.lower_after.items():
            self.scaler.set_floor(version, replicas)


def _has_canary(backends: Mapping[str, Backend], weights: Mapping[str, int]) -> bool:
    return "canary" in backends and weights.get("canary", 0) > 0
