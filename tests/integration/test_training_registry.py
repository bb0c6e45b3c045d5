"""Training logs and registers real versions in an MLflow sqlite store; the registry moves their aliases."""

import os
import warnings

import numpy as np
import pytest

from control_plane.registry import MlflowRegistry
from tests.unit.test_registry_memory import RegistryContract
from training import train
from training.data import FEATURE_NAMES

pytestmark = pytest.mark.integration

SMALL = dict(n_rows=3_000, iterations=30, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh MLflow store holding two small trained versions of `recsys`: baseline, then better."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    art = tmp / "art"
    versions = [
        train.train_and_register(tracking_uri=uri, artifact_location=str(art), profile=p, **SMALL)
        for p in ("baseline", "better")
    ]
    return {"uri": uri, "art": art, "versions": versions, "tmp": tmp}


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])


@pytest.fixture
def global_uri(store):
    """Loading `models:/recsys/N` goes through MLflow's process-wide URI: point it at the store."""
    from training.train import _tracking_uri

    with _tracking_uri(store["uri"]):
        yield


def test_two_versions_are_registered_with_their_profiles(store, client):
    assert store["versions"] == [1, 2]
    infos = MlflowRegistry(store["uri"], "recsys").versions()
    assert [(i.version, i.profile, i.stage, i.aliases) for i in infos] == [
        (1, "baseline", "None", ()),
        (2, "better", "None", ()),
    ]
    assert all(i.run_id and i.created_at > 0 for i in infos)


def test_params_metrics_and_tags_are_logged_on_the_run(store, client):
    info = MlflowRegistry(store["uri"], "recsys").get(2)
    run = client.get_run(info.run_id)
    assert run.data.tags["profile"] == "better"
    assert run.data.params["n_rows"] == "3000" and run.data.params["iterations"] == "30"
    assert run.data.params["depth"] == "6"
    assert set(run.data.metrics) == {"auc", "log_loss", "accuracy"}
    assert 0.6 < run.data.metrics["accuracy"] < 0.85 and 0.6 < run.data.metrics["auc"] < 0.95
    assert info.metrics == run.data.metrics


def test_artifacts_go_to_the_given_location_not_to_mlruns(store):
    assert any(store["art"].rglob("MLmodel"))
    assert not os.path.exists("mlruns")


def test_the_model_has_a_signature_naming_all_sixteen_features(global_uri):
    from mlflow.models import get_model_info

    info = get_model_info("models:/recsys/1")
    assert [c.name for c in info.signature.inputs.inputs] == list(FEATURE_NAMES)
    assert info.saved_input_example_info is not None


def test_a_pinned_version_loads_back_and_predicts_probabilities(store, global_uri):
    import mlflow.catboost

    model = mlflow.catboost.load_model(MlflowRegistry(store["uri"], "recsys").model_uri(2))
    X = np.random.default_rng(0).normal(size=(50, 16))
    p = model.predict_proba(X)[:, 1]
    assert p.shape == (50,) and np.all((p >= 0) & (p <= 1))


def test_the_registry_promotes_and_archives_trained_versions(store):
    registry = MlflowRegistry(store["uri"], "recsys")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry.promote(1)
        registry.set_alias("canary", 2)
        registry.promote(2)
        registry.promote(2)
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "stage" in str(w.message)]
    assert registry.version_for("baseline") == 2 and registry.version_for("previous_baseline") == 1
    assert registry.version_for("canary") is None
    assert registry.get(2).stage == "Production" and registry.get(1).stage == "Archived"
    registry.archive(2)
    assert registry.version_for("baseline") is None and registry.get(2).stage == "Archived"
    assert registry.model_uri(2) == "models:/recsys/2"


def test_the_cli_trains_and_prints_the_version(store, monkeypatch, capsys):
    monkeypatch.setenv("RECSYS_STATE_DIR", str(store["tmp"] / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("REGISTERED_MODEL_NAME", "cli-model")
    assert train.main(["--profile", "control", "--rows", "1000", "--iterations", "5"]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert MlflowRegistry(store["uri"], "cli-model").get(1).profile == "control"


class TestMlflowRegistry(RegistryContract):
    @pytest.fixture
    def registry(self, store, client, request):
        """A registered model of its own per test, whose three versions reuse a trained model."""
        name = f"contract-{request.node.name}"[:200]
        source = client.get_model_version("recsys", "1")
        client.create_registered_model(name)
        for profile in ("control", "baseline", "better"):
            client.create_model_version(
                name, source=source.source, run_id=source.run_id, tags={"profile": profile}
            )
        return MlflowRegistry(store["uri"], name)
