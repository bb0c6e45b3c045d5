"""The model-registry seam: plain types, the interface, its errors and the alias rules."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from control_plane.errors import RecsysError

ROLE_ALIASES = ("baseline", "canary", "control")
PREVIOUS = "previous_baseline"
ALIASES = (*ROLE_ALIASES, PREVIOUS)
# Aliases are the source of truth; stages only mirror them for tools that still read stages.
STAGE_FOR_ALIAS = {"baseline": "Production", "canary": "Staging", "control": "Staging", PREVIOUS: "Archived"}
ARCHIVED = "Archived"
NO_STAGE = "None"


class RegistryError(RecsysError):
    """The model registry could not do what was asked."""

    http_status = 502


class VersionNotFound(RegistryError):
    http_status = 404

    def __init__(self, version: int, model_name: str = "recsys"):
        super().__init__(f"model {model_name!r} has no version {version}")
        self.version = version


class UnknownAlias(RegistryError):
    http_status = 400

    def __init__(self, alias: str):
        super().__init__(f"unknown registry alias {alias!r}; expected one of {', '.join(ALIASES)}")
        self.alias = alias


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered version as the control plane sees it."""

    version: int
    aliases: tuple[str, ...]
    stage: str
    profile: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0  # seconds since the epoch
    run_id: str | None = None


@runtime_checkable
class ModelRegistry(Protocol):
    """Registered versions and their role aliases; every method is idempotent."""

    def versions(self) -> list[ModelVersionInfo]:
        """Every version, oldest first."""

    def get(self, version: int) -> ModelVersionInfo:
        """One version; raises VersionNotFound."""

    def version_for(self, alias: str) -> int | None:
        """The version holding `alias`, or None."""

    def set_alias(self, alias: str, version: int) -> None:
        """Move `alias` to `version`; the version's stage follows the alias."""

    def remove_alias(self, alias: str) -> None:
        """Remove `alias` from whichever version holds it (nothing if none does)."""

    def promote(self, version: int) -> None:
        """`version` becomes baseline; the old baseline becomes previous_baseline; canary is cleared."""

    def archive(self, version: int) -> None:
        """Remove the version's role aliases and archive it."""

    def model_uri(self, version: int) -> str:
        """The pinned URI of one version, e.g. ``models:/recsys/3``; never a moving reference."""


def check_alias(alias: str) -> str:
    """`alias` if it is one the registry manages, else UnknownAlias."""
    if alias not in ALIASES:
        raise UnknownAlias(alias)
    return alias


def stage_for(aliases: Iterable[str]) -> str | None:
    """The stage a version holding `aliases` should be in; None when it holds none (leave it)."""
    held = set(aliases)
    for alias in ALIASES:  # precedence: baseline, canary, control, previous_baseline
        if alias in held:
            return STAGE_FOR_ALIAS[alias]
    return None


def apply_promotion(registry: ModelRegistry, version: int) -> None:
    """The promotion rule, written once over the interface's other verbs."""
    registry.get(version)  # VersionNotFound before anything moves
    old = registry.version_for("baseline")
    if old is not None and old != version:
        registry.set_alias(PREVIOUS, old)
    if registry.version_for("canary") == version:
        registry.remove_alias("canary")
    if registry.version_for(PREVIOUS) == version:
        registry.remove_alias(PREVIOUS)  # a rollback to the previous baseline
    registry.set_alias("baseline", version)
