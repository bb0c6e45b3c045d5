"""The model registry behind a small interface: role aliases, their stages, pinned URIs."""

from control_plane.registry.base import (
    ALIASES,
    PREVIOUS,
    ROLE_ALIASES,
    STAGE_FOR_ALIAS,
    ModelRegistry,
    ModelVersionInfo,
    RegistryError,
    UnknownAlias,
    VersionNotFound,
)
from control_plane.registry.memory import InMemoryRegistry
from control_plane.registry.mlflow_registry import MlflowRegistry

__all__ = [
    "ALIASES",
    "PREVIOUS",
    "ROLE_ALIASES",
    "STAGE_FOR_ALIAS",
    "InMemoryRegistry",
    "MlflowRegistry",
    "ModelRegistry",
    "ModelVersionInfo",
    "RegistryError",
    "UnknownAlias",
    "VersionNotFound",
]
