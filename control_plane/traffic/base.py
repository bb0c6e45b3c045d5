"""The traffic seam: which version holds each role and how much of the weighted traffic it gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from control_plane.settings import ROLES

__all__ = [
    "ROLES",
    "Backend",
    "InvalidBackends",
    "Mirror",
    "InvalidWeights",
    "TrafficRouter",
    "TrafficStateUnreadable",
    "check_assignment",
    "merge_backends",
    "validate_backends",
    "validate_weights",
]


@dataclass(frozen=True)
class Backend:
    """One deployed model version and the URL it answers on (e.g. `http://127.0.0.1:3101`)."""

    version: int
    url: str


@dataclass(frozen=True)
class Mirror:
    """A shadow version and the percentage of the gateway's weighted requests Traefik copies to it.

    Traefik's `mirroring` service sends the copy after the main answer and discards the mirror's answer,
    so the users only ever see the weighted split's answers.
    """

    version: int
    percent: int

    def __post_init__(self) -> None:
        if (
            isinstance(self.percent, bool)
            or not isinstance(self.percent, int)
            or not 0 <= self.percent <= 100
        ):
            raise ValueError(f"mirror percent must be an integer from 0 to 100, got {self.percent!r}")


class InvalidWeights(ValueError):
    """Weights that cannot be put in force; the message names the role and the problem."""


class InvalidBackends(ValueError):
    """A role-to-version assignment that cannot be put in force; the message names the problem."""


class TrafficStateUnreadable(RuntimeError):
    """The persisted routing state (e.g. Traefik's dynamic file) exists but cannot be read back."""


def validate_weights(weights: Mapping[str, object]) -> dict[str, int]:
    """Weights for every role: non-negative integers, at least one positive; missing roles mean 0."""
    if not isinstance(weights, Mapping):
        raise InvalidWeights(f"weights must be a mapping of role to integer, got {type(weights).__name__}")
    unknown = sorted(str(r) for r in weights if r not in ROLES)
    if unknown:
        raise InvalidWeights(f"unknown role(s) {', '.join(map(repr, unknown))}; roles are {', '.join(ROLES)}")
    clean: dict[str, int] = {}
    for role in ROLES:
        value = weights.get(role, 0)
        # bool is an int subclass: True would silently mean weight 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidWeights(
                f"weight for {role!r} must be an integer, got {type(value).__name__} {value!r}"
            )
        if value < 0:
            raise InvalidWeights(f"weight for {role!r} must not be negative, got {value}")
        if value > 100:
            raise InvalidWeights(f"weight for {role!r} must be at most 100 (a percentage), got {value}")
        clean[role] = value
    if not any(clean.values()):
        raise InvalidWeights("at least one role must have a positive weight; all are 0")
    return clean


def validate_backends(backends: Mapping[str, Backend | None]) -> dict[str, Backend | None]:
    """Check an update of role assignments (None removes a role's backend); returns a plain dict."""
    unknown = sorted(str(r) for r in backends if r not in ROLES)
    if unknown:
        raise InvalidBackends(
            f"unknown role(s) {', '.join(map(repr, unknown))}; roles are {', '.join(ROLES)}"
        )
    clean: dict[str, Backend | None] = {}
    for role, backend in backends.items():
        if backend is not None:
            if not isinstance(backend, Backend):
                raise InvalidBackends(
                    f"backend for {role!r} must be a Backend or None, got {type(backend).__name__}"
                )
            if (
                isinstance(backend.version, bool)
                or not isinstance(backend.version, int)
                or backend.version < 0
            ):
                raise InvalidBackends(
                    f"version for {role!r} must be a non-negative integer, got {backend.version!r}"
                )
            if not backend.url.startswith(("http://", "https://")):
                raise InvalidBackends(
                    f"URL for {role!r} must start with http:// or https://, got {backend.url!r}"
                )
        clean[role] = backend
    return clean


def merge_backends(
    current: Mapping[str, Backend], update: Mapping[str, Backend | None]
) -> dict[str, Backend]:
    """Apply an update to the current assignments; one process serves one version, so versions are distinct."""
    merged = dict(current)
    for role, backend in validate_backends(update).items():
        if backend is None:
            merged.pop(role, None)
        else:
            merged[role] = backend
    holders: dict[int, str] = {}
    for role in ROLES:
        if role in merged:
            version = merged[role].version
            if version in holders:
                raise InvalidBackends(
                    f"version {version} cannot hold both {holders[version]!r} and {role!r}; "
                    "one version holds at most one role"
                )
            holders[version] = role
    return {role: merged[role] for role in ROLES if role in merged}


def check_assignment(weights: Mapping[str, int], backends: Mapping[str, Backend]) -> None:
    """A role without a backend must have weight 0: its share would otherwise have nowhere to go."""
    for role in ROLES:
        if weights.get(role, 0) > 0 and role not in backends:
            raise InvalidWeights(
                f"role {role!r} has weight {weights[role]} but no backend; "
                "give it a backend first, or set its weight to 0"
            )


class TrafficRouter(Protocol):
    """How traffic is split between the roles; no gateway-specific type crosses it."""

    def get_weights(self) -> dict[str, int]:
        """The weight in force for every role (0 when a role holds nothing)."""
        ...

    def set_weights(self, weights: Mapping[str, int]) -> None:
        """Put new weights in force; validated first, and a role with no backend must get 0."""
        ...

    def get_backends(self) -> dict[str, Backend]:
        """Role -> the backend holding it, for the roles that hold one."""
        ...

    def set_backends(self, backends: Mapping[str, Backend | None]) -> None:
        """Change which version holds the named roles (None removes; a removed role must weigh 0)."""
        ...

    def apply(self, backends: Mapping[str, Backend | None], weights: Mapping[str, int]) -> None:
        """Change backends and weights together in one write (a promotion swaps both at once)."""
        ...

    def get_mirror(self) -> Mirror | None:
        """The shadow version the gateway copies a share of its weighted requests to, if any."""
        ...

    def set_mirror(self, mirror: Mirror | None) -> None:
        """Start, change or (None) stop mirroring; the version must hold a role."""
        ...
