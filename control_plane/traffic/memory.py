"""A TrafficRouter held in memory, for unit tests and for running without a gateway."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from control_plane.traffic.base import (
    ROLES,
    Backend,
    InvalidBackends,
    Mirror,
    check_assignment,
    merge_backends,
    validate_weights,
)


class InMemoryRouter:
    """Same rules as the Traefik router; remembers every write so tests can assert on the history."""

    def __init__(
        self,
        backends: Mapping[str, Backend | None] | None = None,
        weights: Mapping[str, int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Backend] = {}
        self._weights: dict[str, int] = dict.fromkeys(ROLES, 0)
        self._mirror: Mirror | None = None
        self.writes: list[tuple[dict[str, Backend], dict[str, int]]] = []
        if backends:
            self.set_backends(backends)
        if weights is not None:
            self.set_weights(weights)

    def get_weights(self) -> dict[str, int]:
        with self._lock:
            return dict(self._weights)

    def set_weights(self, weights: Mapping[str, int]) -> None:
        with self._lock:
            self._put(self._backends, validate_weights(weights))

    def get_backends(self) -> dict[str, Backend]:
        with self._lock:
            return dict(self._backends)

    def set_backends(self, backends: Mapping[str, Backend | None]) -> None:
        with self._lock:
            self._put(merge_backends(self._backends, backends), self._weights)

    def apply(self, backends: Mapping[str, Backend | None], weights: Mapping[str, int]) -> None:
        with self._lock:
            self._put(merge_backends(self._backends, backends), validate_weights(weights))

    def get_mirror(self) -> Mirror | None:
        with self._lock:
            return self._mirror

    def set_mirror(self, mirror: Mirror | None) -> None:
        with self._lock:
            if mirror is not None and mirror.version not in {b.version for b in self._backends.values()}:
                raise InvalidBackends(f"version {mirror.version} holds no role: it cannot be mirrored to")
            self._mirror = mirror

    def release(self, version: int) -> None:
        with self._lock:
            if self._mirror is not None and self._mirror.version == version:
                self._mirror = None

    def _put(self, backends: dict[str, Backend], weights: dict[str, int]) -> None:
        check_assignment(weights, backends)
        if self._mirror is not None and self._mirror.version not in {b.version for b in backends.values()}:
            self._mirror = None  # as the Traefik router: a version that lost its role is not mirrored to
        self._backends, self._weights = backends, weights
        self.writes.append((dict(backends), dict(weights)))
