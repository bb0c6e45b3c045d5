"""One Bento per registered MLflow version: `recsys build --version N` makes `recsys:vN`."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from bentos.service_names import bento_tag, model_tag

log = logging.getLogger("recsys.build")

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENTOFILE = PROJECT_DIR / "bentofile.yaml"


class BentoBuildError(Exception):
    """A Bento could not be built."""


class ModelVersionNotFound(BentoBuildError):
    """The MLflow registry has no such version."""


def build_bento(
    version: int, *, tracking_uri: str, model_name: str = "recsys", bentoml_home: Path | None = None
) -> str:
    """Import `models:/{model_name}/{version}` and build the Bento `{model_name}:v{version}` pinned to it.

    Into `bentoml_home` when given (the home `bentoml serve` will serve it from), else BentoML's own.
    Idempotent: an existing Bento (or imported model) is reused. Returns the Bento tag.
    """
    from bentos.bentoml_fixes import no_usage_tracking, use_bentoml_home

    if bentoml_home is not None:
        use_bentoml_home(str(bentoml_home))
    no_usage_tracking()
    import bentoml
    from bentoml.exceptions import NotFound

    tag = bento_tag(version, model_name)
    try:
        return str(bentoml.bentos.get(tag).tag)
    except NotFound:
        pass
    import_model(version, tracking_uri=tracking_uri, model_name=model_name)
    bento = bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        build_ctx=str(PROJECT_DIR),
        name=model_name,
        version=f"v{version}",
        labels={"registered_model": model_name, "model_version": str(version)},
        args={"model_version": version, "model_name": model_name},
        # The service module reads its arguments when imported: re-import it for every build.
        reload=True,
    )
    log.info("built %s from %s", bento.tag, model_tag(version, model_name))
    return str(bento.tag)


def import_model(version: int, *, tracking_uri: str, model_name: str = "recsys") -> str:
    """Copy registry version `version` into the BentoML model store as `{model_name}-model:v{version}`."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = model_tag(version, model_name)
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound:
        pass
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise ModelVersionNotFound(
            f"MLflow registry at {tracking_uri} has no version {version} of model {model_name!r}"
        ) from exc
    with _mlflow_uris(tracking_uri):
        model = bentoml.mlflow.import_model(
            tag,
            model_uri=f"models:/{model_name}/{version}",
            labels={"registered_model": model_name, "model_version": str(version)},
            metadata={"mlflow_run_id": mv.run_id or "", "mlflow_source": mv.source or ""},
        )
    return str(model.tag)


@contextlib.contextmanager
def _mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow resolves `models:/` through process-wide URIs: set them for the import, then restore."""
    import mlflow

    tracking = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    registry = mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry if registry != uri else None)


def main(argv: list[str] | None = None) -> int:
    """`recsys build --version N`: print the Bento tag."""
    from control_plane.settings import Settings

    parser = argparse.ArgumentParser(
        prog="recsys build", description="Build the Bento for one registered version."
    )
    parser.add_argument("--version", type=int, required=True, help="registered MLflow model version")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        tag = build_bento(
            args.version,
            tracking_uri=settings.mlflow_tracking_uri,
            model_name=settings.registered_model_name,
            bentoml_home=settings.bentoml_home,
        )
    except BentoBuildError as exc:
        parser.exit(2, f"recsys build: {exc}\n")
    print(tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
