"""Train a profile's CatBoost model, log it to MLflow and register a new version."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from control_plane.settings import Settings
from training.data import FEATURE_NAMES
from training.profiles import PROFILES, Profile, evaluate, fit, get_profile, holdout_data

EXPERIMENT_NAME = "recsys"
HOLDOUT_ROWS = 20_000
PROGRESS_DELAY_S = 2.0  # the bar appears only when training takes longer than this


def train_and_register(
    *,
    tracking_uri: str,
    artifact_location: str | None,
    model_name: str = "recsys",
    profile: str = "baseline",
    n_rows: int | None = None,
    iterations: int | None = None,
    progress: bool = True,
) -> int:
    """Train `profile`, log params, metrics and the model to MLflow; return the new version number."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    spec = get_profile(profile, n_rows=n_rows, iterations=iterations)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = _experiment_id(client, artifact_location)

    with _progress_bar(spec, enabled=progress) as on_iteration:
        model = fit(spec, on_iteration=on_iteration)
    X_holdout, y_holdout = holdout_data(HOLDOUT_ROWS)
    metrics = evaluate(model, X_holdout, y_holdout)

    # Named float columns: the signature then documents every feature the service must send. The
    # output is what the pyfunc flavour returns (CatBoost's predict: the 0/1 class); services load
    # the catboost flavour and score with predict_proba.
    example = pd.DataFrame(X_holdout[:5], columns=list(FEATURE_NAMES))
    signature = infer_signature(example, model.predict(example))

    # MLflow's fluent API, and its sqlite registry resolving `models:/<model_id>`, read the global URI.
    with _tracking_uri(tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id, run_name=spec.name) as run:
            mlflow.set_tags({"profile": spec.name, "description": spec.description})
            mlflow.log_params(spec.params())
            info = mlflow.catboost.log_model(model, name="model", signature=signature, input_example=example)
            mlflow.log_metrics(metrics, model_id=info.model_id)  # on the run and on the logged model
        _ensure_registered_model(client, model_name)
        version = client.create_model_version(
            name=model_name,
            source=info.model_uri,
            run_id=run.info.run_id,
            tags={"profile": spec.name},
            model_id=info.model_id,
        )
    return int(version.version)


def _experiment_id(client, artifact_location: str | None) -> str:
    """The experiment's id, creating it with our artifact location (else sqlite stores use ./mlruns)."""
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if artifact_location:
        path = Path(artifact_location)
        location = path.absolute().as_uri() if "://" not in artifact_location else artifact_location
        if "://" not in artifact_location:
            path.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT_NAME, artifact_location=location)


def _ensure_registered_model(client, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide URI (which it also exports to the environment) at `uri`, then restore it."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextlib.contextmanager
def _progress_bar(spec: Profile, *, enabled: bool) -> Iterator[object]:
    """An on_iteration callback driving a tqdm bar (shown only if training is slow), or None."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=spec.iterations, desc=f"training {spec.name}", unit="tree", delay=PROGRESS_DELAY_S
    ) as bar:
        yield lambda built: bar.update(built - bar.n)


def main(argv: list[str] | None = None, settings=None) -> int:
    """`recsys train [--profile NAME] [--rows N] [--iterations N]`: print the new version number."""
    parser = argparse.ArgumentParser(prog="recsys train", description="Train and register a model version.")
    parser.add_argument("--profile", default="baseline", choices=sorted(PROFILES))
    parser.add_argument("--rows", type=int, default=None, help="training rows (default: the profile's)")
    parser.add_argument("--iterations", type=int, default=None, help="trees (default: the profile's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    settings = settings or Settings.from_env()
    version = train_and_register(
        tracking_uri=settings.mlflow_tracking_uri,
        artifact_location=str(settings.mlflow_artifact_root),
        model_name=settings.registered_model_name,
        profile=args.profile,
        n_rows=args.rows,
        iterations=args.iterations,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(version)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
