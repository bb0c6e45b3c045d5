"""An in-memory model registry with the same semantics as the MLflow one, for unit tests."""

from __future__ import annotations

import dataclasses
import time

from control_plane.registry.base import (
    ARCHIVED,
    NO_STAGE,
    ROLE_ALIASES,
    ModelVersionInfo,
    VersionNotFound,
    apply_promotion,
    check_alias,
    stage_for,
)


class InMemoryRegistry:
    """Versions, aliases and stages held in dicts."""

    def __init__(self, model_name: str = "recsys"):
        self.model_name = model_name
        self._versions: dict[int, ModelVersionInfo] = {}
        self._aliases: dict[str, int] = {}

    def add_version(
        self,
        *,
        profile: str | None = None,
        metrics: dict[str, float] | None = None,
        run_id: str | None = None,
    ) -> int:
        """Register a new version (what training does against MLflow); returns its number."""
        version = max(self._versions, default=0) + 1
        self._versions[version] = ModelVersionInfo(
            version=version,
            aliases=(),
            stage=NO_STAGE,
            profile=profile,
            metrics=dict(metrics or {}),
            created_at=time.time(),
            run_id=run_id,
        )
        return version

    def versions(self) -> list[ModelVersionInfo]:
        return [self.get(v) for v in sorted(self._versions)]

    def get(self, version: int) -> ModelVersionInfo:
        try:
            info = self._versions[version]
        except KeyError:
            raise VersionNotFound(version, self.model_name) from None
        held = tuple(a for a in sorted(self._aliases) if self._aliases[a] == version)
        return dataclasses.replace(info, aliases=held, metrics=dict(info.metrics))

    def version_for(self, alias: str) -> int | None:
        return self._aliases.get(check_alias(alias))

    def set_alias(self, alias: str, version: int) -> None:
        check_alias(alias)
        self.get(version)
        previous = self._aliases.get(alias)
        self._aliases[alias] = version
        self._sync_stage(version)
        if previous is not None and previous != version:
            self._sync_stage(previous)

    def remove_alias(self, alias: str) -> None:
        previous = self._aliases.pop(check_alias(alias), None)
        if previous is not None:
            self._sync_stage(previous)

    def promote(self, version: int) -> None:
        apply_promotion(self, version)

    def archive(self, version: int) -> None:
        self.get(version)
        for alias in ROLE_ALIASES:
            if self._aliases.get(alias) == version:
                del self._aliases[alias]
        self._set_stage(version, ARCHIVED)

    def model_uri(self, version: int) -> str:
        self.get(version)
        return f"models:/{self.model_name}/{version}"

    def _sync_stage(self, version: int) -> None:
        stage = stage_for(self.get(version).aliases)
        if stage is not None:  # a version with no alias keeps its stage
            self._set_stage(version, stage)

    def _set_stage(self, version: int, stage: str) -> None:
        self._versions[version] = dataclasses.replace(self._versions[version], stage=stage)
