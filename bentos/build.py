"""One Bento per registered MLflow version: `recsys build --version N` makes `recsys:vN`."""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from bentos.bentoml_fixes import no_usage_tracking, use_bentoml_home
from bentos.service_names import bento_tag, model_tag
from control_plane.settings import Settings

log = logging.getLogger("recsys.build")

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENTOFILE = PROJECT_DIR / "bentofile.yaml"
SERVICE_MODULE = "bentos.service"


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
    with tempfile.TemporaryDirectory(prefix="bentofile-") as tmp:
        bentofile = Path(tmp) / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(bentofile_config()))
        bento = bentoml.bentos.build_bentofile(
            str(bentofile),
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


def bentofile_config() -> dict:
    """bentofile.yaml, with `include` the files the service imports (`bento_sources`), never a list by hand."""
    config = yaml.safe_load(BENTOFILE.read_text())
    return {**config, "include": bento_sources()}


def bento_sources(root: Path = PROJECT_DIR, entry: str = SERVICE_MODULE) -> list[str]:
    """The project's files a Bento needs: `entry`'s module and every project module it imports, transitively.

    Read from the source (every import statement, those inside functions included), so that a new
    import from bentos/ is in the next Bento built; paths relative to `root`, packages' __init__.py too.
    """
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _module_file(root, name)
        if name in seen or path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages' __init__.py
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found = [
                    node.module,
                    *(f"{node.module}.{a.name}" for a in node.names),
                ]  # a name may be a module
            else:
                continue
            todo += [n for n in found if n.split(".")[0] in packages]
    return sorted(p.relative_to(root).as_posix() for p in seen.values())


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


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
