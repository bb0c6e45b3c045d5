"""The model registry on MLflow: aliases are the truth, the deprecated stages follow them.

This is the only module that calls MLflow's stage API, and the only place whose
deprecation warning is silenced.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from control_plane.registry.base import (
    ARCHIVED,
    NO_STAGE,
    ROLE_ALIASES,
    ModelVersionInfo,
    RegistryError,
    VersionNotFound,
    apply_promotion,
    check_alias,
    stage_for,
)

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


def create_store(tracking_uri: str, artifact_root: str) -> None:
    """Create a database-backed MLflow store (its tables and every migration) unless it exists already.

    Two processes that open a fresh store at once both create its tables and run its migrations, and one
    of them fails (`no such column: spans.dimension_attributes`): `recsys up` calls this once, before it
    starts the MLflow server or opens the registry itself, so neither ever finds the store half made.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(tracking_uri, artifact_root).engine.dispose()


class _Missing(RegistryError):
    """MLflow says the thing does not exist; callers turn it into the specific error."""


class MlflowRegistry:
    """One registered model in an MLflow tracking server or store."""

    def __init__(self, tracking_uri: str, model_name: str):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self._client = None

    @property
    def client(self):
        """The MlflowClient, created on first use (nothing connects at construction)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def versions(self) -> list[ModelVersionInfo]:
        with self._errors():
            found, token = [], None
            while True:
                page = self.client.search_model_versions(f"name = '{self.model_name}'", page_token=token)
                found.extend(page)
                token = page.token
                if not token:
                    break
        aliases = self._alias_map()
        return sorted((self._info(mv, aliases) for mv in found), key=lambda i: i.version)

    def get(self, version: int) -> ModelVersionInfo:
        return self._info(self._model_version(version), self._alias_map())

    def version_for(self, alias: str) -> int | None:
        return self._alias_map().get(check_alias(alias))

    def set_alias(self, alias: str, version: int) -> None:
        check_alias(alias)
        self._model_version(version)
        previous = self.version_for(alias)
        if previous != version:
            with self._errors():
                self.client.set_registered_model_alias(self.model_name, alias, str(version))
        self._sync_stage(version)
        if previous is not None and previous != version:
            self._sync_stage(previous)

    def remove_alias(self, alias: str) -> None:
        previous = self.version_for(alias)
        if previous is None:
            return
        with self._errors():
            self.client.delete_registered_model_alias(self.model_name, alias)
        self._sync_stage(previous)

    def promote(self, version: int) -> None:
        apply_promotion(self, version)

    def archive(self, version: int) -> None:
        self._model_version(version)
        for alias, holder in self._alias_map().items():
            if holder == version and alias in ROLE_ALIASES:
                with self._errors():
                    self.client.delete_registered_model_alias(self.model_name, alias)
        self._set_stage(version, ARCHIVED)

    def model_uri(self, version: int) -> str:
        self._model_version(version)
        return f"models:/{self.model_name}/{version}"

    # -- MLflow calls ---------------------------------------------------------------------------

    def _model_version(self, version: int):
        try:
            with self._errors():
                return self.client.get_model_version(self.model_name, str(int(version)))
        except _Missing:
            raise VersionNotFound(version, self.model_name) from None

    def _alias_map(self) -> dict[str, int]:
        """alias -> version for the registered model; empty while nothing is registered."""
        try:
            with self._errors():
                model = self.client.get_registered_model(self.model_name)
        except _Missing:  # the registered model itself does not exist yet
            return {}
        return {alias: int(v) for alias, v in model.aliases.items()}

    def _info(self, mv, aliases: dict[str, int]) -> ModelVersionInfo:
        version = int(mv.version)
        return ModelVersionInfo(
            version=version,
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            stage=mv.current_stage or NO_STAGE,
            profile=(mv.tags or {}).get("profile"),
            metrics=self._run_metrics(mv.run_id),
            created_at=(mv.creation_timestamp or 0) / 1000.0,
            run_id=mv.run_id or None,
        )

    def _run_metrics(self, run_id: str | None) -> dict[str, float]:
        if not run_id:
            return {}
        try:
            with self._errors():
                return dict(self.client.get_run(run_id).data.metrics)
        except RegistryError:  # the run was deleted; the version is still usable
            return {}

    def _sync_stage(self, version: int) -> None:
        aliases = self._alias_map()
        stage = stage_for(a for a, v in aliases.items() if v == version)
        if stage is not None:  # a version with no alias keeps its stage
            self._set_stage(version, stage)

    def _set_stage(self, version: int, stage: str) -> None:
        if self._model_version(version).current_stage == stage:
            return
        with self._errors(), warnings.catch_warnings():
            # Stages are deprecated in favour of aliases; we keep them in step for tools that read them.
            warnings.simplefilter("ignore", FutureWarning)
            self.client.transition_model_version_stage(
                self.model_name, str(version), stage, archive_existing_versions=False
            )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """MLflow's exceptions become RegistryError (not-found ones the private _Missing)."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            error = _Missing if exc.error_code == _NOT_FOUND else RegistryError
            raise error(f"MLflow registry {self.tracking_uri}: {exc.message}") from exc
