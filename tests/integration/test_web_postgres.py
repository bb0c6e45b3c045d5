"""The web layer over the real Postgres: a canary started through the API, the ledger, /readyz, /metrics."""

from __future__ import annotations

import pytest

from control_plane import services
from control_plane.context import Context
from control_plane.db.engine import make_engine
from control_plane.deployer.memory import InMemoryDeployer
from control_plane.registry.memory import InMemoryRegistry
from control_plane.traffic.memory import InMemoryRouter
from control_plane.web import create_app
from tests.conftest import free_port
from tests.web_support import TOKEN, make_context, make_settings, seed_predictions

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def ctx(tmp_path, pg_engine, pg_url):
    return make_context(make_settings(tmp_path, pg_url), pg_engine)


def test_a_canary_started_through_the_api_is_in_the_ledger(ctx):
    client = create_app(ctx=ctx).test_client()
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2}, minutes=5)
    resp = client.post("/api/rollouts", json={"version": 3, "policy": {"name": "threshold"}}, headers=AUTH)
    assert resp.status_code == 201, resp.get_json()
    rid = resp.get_json()["id"]
    assert client.post(f"/api/rollouts/{rid}/evaluate", headers=AUTH).status_code == 200
    rows = client.get(f"/api/decisions?rollout_id={rid}").get_json()["decisions"]
    assert [r["actor"] for r in rows] == ["api", "api"]
    assert rows[-1]["action"] == "start"
    assert client.get("/api/rollouts").get_json()["active"] == rid


def test_timeseries_and_metrics_read_postgres(ctx):
    client = create_app(ctx=ctx).test_client()
    # older than the attribution window (300 s by default), so the label job can count them
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2}, minutes=15)
    services.close_labels(ctx)  # the label job: accuracy counts predictions whose window has closed
    points = client.get("/api/timeseries?window_s=1800&bucket_s=60").get_json()["points"]
    assert {p["role"] for p in points} == {"baseline", "control"}
    client.post("/api/rollouts", json={"version": 3}, headers=AUTH)
    text = client.get("/metrics").get_data(as_text=True)
    assert "recsys_control_plane_database_up 1.0" in text
    assert 'recsys_decisions_total{action="start"} 1.0' in text
    assert 'recsys_accuracy{role="baseline"}' in text


def test_readyz_is_200_with_postgres_up(ctx):
    resp = create_app(ctx=ctx).test_client().get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["database"].startswith("postgresql database 'recsys_test_")


def test_readyz_is_503_naming_the_database_when_it_is_unreachable(tmp_path):
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/recsys_gone"
    engine = make_engine(url)
    settings = make_settings(tmp_path, url)
    ctx = Context(settings, engine, InMemoryRegistry(), InMemoryRouter(), InMemoryDeployer())
    client = create_app(ctx=ctx).test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert "postgresql database 'recsys_gone' at 127.0.0.1" in resp.get_json()["error"]
    assert client.get("/healthz").status_code == 200  # alive, just not ready
    api = client.get("/api/rollouts")
    assert api.status_code == 503 and "database is unavailable" in api.get_json()["error"]
    engine.dispose()
