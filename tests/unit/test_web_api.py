"""The JSON API, /metrics, the health checks and the UI, over the in-memory Context and SQLite."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest

from control_plane import services
from control_plane.action_lock import ActionLock
from control_plane.analysis.types import Phase
from control_plane.db.engine import make_engine, migrate
from control_plane.web import create_app
from control_plane.web.logs import JsonFormatter
from tests.action_lock_support import held_by_another_thread
from tests.web_support import TOKEN, csrf_token, log_in, make_context, make_settings, seed_predictions

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def ctx(tmp_path):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    migrate(url)
    engine = make_engine(url)
    yield make_context(make_settings(tmp_path / "state", url), engine)
    engine.dispose()


@pytest.fixture
def app(ctx):
    return create_app(ctx=ctx)


@pytest.fixture
def client(app):
    return app.test_client()


def start(client, version=3, **body):
    resp = client.post("/api/rollouts", json={"version": version, **body}, headers=AUTH)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


# --- health ------------------------------------------------------------------
def test_healthz_answers_without_touching_anything(client):
    assert client.get("/healthz").get_json() == {"status": "alive"}


def test_readyz_names_the_database_it_reached(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json()["database"].startswith("sqlite database ")


def test_nothing_is_bootstrapped_until_a_request_needs_it(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("control_plane.web.wiring.bootstrap", lambda s: built.append(s) or 1 / 0)
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'x.db'}"))
    assert built == []
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert built == []
    resp = client.get("/readyz")
    assert resp.status_code == 503 and "x.db" in resp.get_json()["error"]


# --- reading -----------------------------------------------------------------
def test_versions_lists_roles_aliases_stages_weights_and_endpoints(client):
    versions = {v["version"]: v for v in client.get("/api/versions").get_json()["versions"]}
    assert versions[1]["role"] == "baseline" and versions[1]["weight"] == 95
    assert versions[1]["aliases"] == ["baseline"] and versions[1]["stage"] == "Production"
    assert versions[1]["endpoint"].startswith("http://")
    assert versions[2]["role"] == "control" and versions[2]["weight"] == 5
    assert versions[3]["role"] is None and versions[3]["endpoint"] is None


def test_traffic_shows_weights_and_versions_per_role(client):
    body = client.get("/api/traffic").get_json()
    assert body["weights"] == {"baseline": 95, "canary": 0, "control": 5}
    assert body["versions"] == {"baseline": 1, "canary": None, "control": 2}


def test_rollouts_lists_and_gets_by_id(client):
    started = start(client)
    body = client.get("/api/rollouts").get_json()
    assert body["active"] == started["id"]
    assert [r["id"] for r in body["rollouts"]] == [started["id"]]
    one = client.get(f"/api/rollouts/{started['id']}").get_json()
    assert one["candidate_version"] == 3 and one["phase"] == "progressing"


def test_an_unknown_rollout_is_a_404_naming_it(client):
    resp = client.get("/api/rollouts/42")
    assert resp.status_code == 404
    assert resp.get_json() == {"error": "rollout 42 does not exist"}


def test_decisions_are_listed_per_rollout(client):
    started = start(client)
    client.post(f"/api/rollouts/{started['id']}/pause", headers=AUTH)
    rows = client.get(f"/api/decisions?rollout_id={started['id']}&limit=10").get_json()["decisions"]
    assert [r["action"] for r in rows] == ["pause", "start"]
    assert rows[0]["actor"] == "api"
    assert client.get("/api/decisions?rollout_id=999").get_json()["decisions"] == []


def test_window_metrics_summarise_each_role(client, ctx):
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2})
    services.close_labels(ctx)  # the label job: outcomes count once their attribution window closed
    roles = client.get("/api/metrics?window_s=3600").get_json()["roles"]
    assert roles["baseline"]["requests"] == 120
    assert roles["baseline"]["accuracy"] is not None
    assert roles["canary"]["version"] is None


def test_the_scrape_s_sql_counts_match_the_row_by_row_window(client, ctx):
    from control_plane import services

    seed_predictions(ctx.engine, {"baseline": 1, "control": 2})
    services.close_labels(ctx)
    rows = services.window_metrics(ctx)["roles"]
    counts = services.window_counts(ctx)
    assert set(counts) == {"baseline", "control"}
    for role, c in counts.items():
        assert (c["version"], c["requests"], c["labelled"]) == (
            rows[role]["version"],
            rows[role]["requests"],
            rows[role]["labelled"],
        )
        assert c["error_rate"] == pytest.approx(rows[role]["error_rate"], abs=1e-6)
        assert c["accuracy"] == pytest.approx(rows[role]["accuracy"], abs=1e-6)
        assert c["labelled"] > 0


def test_timeseries_has_a_point_per_bucket_and_role(client, ctx):
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2}, minutes=10)
    body = client.get("/api/timeseries?window_s=1800&bucket_s=60").get_json()
    assert body["bucket_s"] == 60
    assert {p["role"] for p in body["points"]} == {"baseline", "control"}
    assert {"t", "rps", "error_rate", "p99_ms", "accuracy"} <= set(body["points"][0])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/api/decisions?limit=abc", "'limit' must be an integer"),
        ("/api/decisions?limit=0", "'limit' must be between 1 and 1000"),
        ("/api/decisions?rollout_id=x", "'rollout_id' must be an integer"),
        ("/api/metrics?window_s=-5", "'window_s' must be between"),
        ("/api/timeseries?window_s=86400&bucket_s=1", "more than 2000 buckets"),
        ("/api/rollouts?limit=1e3", "'limit' must be an integer"),
    ],
)
def test_bad_query_parameters_are_a_400_naming_them(client, query, message):
    resp = client.get(query)
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]


def test_unknown_paths_and_methods_under_api_answer_json(client):
    assert client.get("/api/nope").get_json()["error"]
    resp = client.delete("/api/versions", headers=AUTH)
    assert resp.status_code == 405 and "error" in resp.get_json()


# --- writing -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["put", "post"])
def test_weights_are_set_with_put_or_post(client, ctx, method):
    resp = getattr(client, method)(
        "/api/traffic", json={"weights": {"baseline": 90, "canary": 0, "control": 10}}, headers=AUTH
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["weights"] == {"baseline": 90, "canary": 0, "control": 10}
    assert ctx.router.get_weights() == {"baseline": 90, "canary": 0, "control": 10}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "field 'weights' must be an object"),
        ({"weights": "baseline=100"}, "field 'weights' must be an object"),
        ({"weights": {"baseline": "100"}}, "weight for 'baseline' must be an integer"),
        ({"weights": {"baseline": True}}, "weight for 'baseline' must be an integer"),
        ({"weights": {"baseline": -1, "control": 5}}, "must not be negative"),
        ({"weights": {"gamma": 100}}, "unknown role(s) 'gamma'"),
        ({"weights": {"baseline": 0}}, "at least one role"),
        ({"weights": {"baseline": 90, "canary": 10}}, "role 'canary' has no deployed version"),
    ],
)
def test_bad_weights_are_a_400_naming_the_field(client, ctx, body, message):
    before = ctx.router.get_weights()
    resp = client.put("/api/traffic", json=body, headers=AUTH)
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]
    assert ctx.router.get_weights() == before


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b'{"weights": NaN}', "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got list"),
        (b"\xff\xfe", "request body is not valid JSON"),
    ],
)
def test_malformed_bodies_are_a_400_not_a_500(client, raw, message):
    resp = client.put("/api/traffic", data=raw, content_type="application/json", headers=AUTH)
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]


def test_a_body_over_the_limit_is_a_413_json(ctx):
    small = dataclasses.replace(ctx.settings, max_body_bytes=512)
    client = create_app(small, ctx).test_client()
    resp = client.put("/api/traffic", json={"weights": {"baseline": 100}, "pad": "x" * 2000}, headers=AUTH)
    assert resp.status_code == 413
    assert "error" in resp.get_json()


def test_starting_a_canary_deploys_it_and_gives_it_the_first_step(client, ctx):
    body = start(client)
    assert body["phase"] == "progressing" and body["canary_weight"] > 0
    assert ctx.router.get_weights()["canary"] == body["canary_weight"]
    assert ctx.registry.version_for("canary") == 3


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "field 'version' must be an integer"),
        ({"version": "3"}, 400, "field 'version' must be an integer, got str '3'"),
        ({"version": 3.0}, 400, "field 'version' must be an integer"),
        ({"version": 0}, 400, "field 'version' must be between 1 and 2147483647, got 0"),
        ({"version": 1}, 400, "version 1 is already the baseline"),
        ({"version": 99}, 404, "has no version 99"),
        ({"version": 3, "policy": "sequential"}, 400, "field 'policy' must be an object"),
        ({"version": 3, "policy": {"name": "coin-flip"}}, 400, "invalid policy"),
    ],
)
def test_bad_rollout_requests_name_what_is_wrong(client, ctx, body, status, message):
    resp = client.post("/api/rollouts", json=body, headers=AUTH)
    assert resp.status_code == status, resp.get_json()
    assert message in resp.get_json()["error"]
    assert ctx.ledger.list() == []


def test_a_second_rollout_while_one_runs_is_a_409(client):
    start(client)
    resp = client.post("/api/rollouts", json={"version": 3}, headers=AUTH)
    assert resp.status_code == 409
    assert "already running" in resp.get_json()["error"]


def test_pause_and_resume(client):
    rid = start(client)["id"]
    assert client.post(f"/api/rollouts/{rid}/pause", headers=AUTH).get_json()["phase"] == "paused"
    again = client.post(f"/api/rollouts/{rid}/pause", headers=AUTH)
    assert again.status_code == 409 and "only a progressing rollout" in again.get_json()["error"]
    assert client.post(f"/api/rollouts/{rid}/resume", headers=AUTH).get_json()["phase"] == "progressing"


def test_promote_now_makes_the_canary_the_baseline(client, ctx):
    rid = start(client)["id"]
    assert (
        client.post(f"/api/rollouts/{rid}/promote", headers=AUTH, json={"reason": "test"}).get_json()["phase"]
        == "promoted"
    )
    assert ctx.registry.version_for("baseline") == 3
    assert ctx.registry.version_for("previous_baseline") == 1


def test_promote_or_rollback_now_without_a_reason_is_a_400_and_changes_nothing(client, ctx):
    rid = start(client)["id"]
    for action in ("promote", "rollback"):
        for body in (None, {}, {"reason": "  "}, {"reason": 3}):
            resp = client.post(f"/api/rollouts/{rid}/{action}", headers=AUTH, json=body)
            assert resp.status_code == 400 and "reason" in resp.get_json()["error"], (action, body)
    assert ctx.ledger.get(rid).phase is Phase.PROGRESSING
    assert ctx.ledger.decisions(rid, 1)[0]["action"] == "start"


def test_an_override_is_marked_in_the_ledger_with_its_reason_actor_and_evidence(client, ctx):
    rid = start(client)["id"]
    client.post(f"/api/rollouts/{rid}/promote", headers=AUTH, json={"reason": "hotfix needed now"})
    row = ctx.ledger.decisions(rid, 1)[0]
    assert row["action"] == "override_promote" and row["actor"] == "api"
    assert row["reason"].startswith("OVERRIDE by api: hotfix needed now (the analysis said ")
    override = row["stats"]["override"]
    assert override["reason"] == "hotfix needed now" and override["analysis_action"] is not None
    assert "samples" in row["stats"] and row["rules"], "the evidence at that moment is recorded"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'recsys_overrides_total{action="promote"} 1.0' in metrics
    assert 'recsys_decisions_total{action="override_promote"} 1.0' in metrics


def test_rollback_now_takes_the_canary_out(client, ctx):
    rid = start(client)["id"]
    assert (
        client.post(f"/api/rollouts/{rid}/rollback", headers=AUTH, json={"reason": "test"}).get_json()[
            "phase"
        ]
        == "rolled_back"
    )
    assert ctx.router.get_weights()["canary"] == 0
    ended = client.post(f"/api/rollouts/{rid}/rollback", headers=AUTH, json={"reason": "test"})
    assert ended.status_code == 409 and "already ended" in ended.get_json()["error"]


def test_an_action_while_another_holds_the_lock_is_a_409_naming_it_and_changes_nothing(client, ctx):
    rid = start(client)["id"]
    ctx.action_lock.wait_s = 0.1
    with held_by_another_thread(ActionLock(ctx.engine), "evaluate by scheduler"):
        resp = client.post(f"/api/rollouts/{rid}/rollback", headers=AUTH, json={"reason": "test"})
        assert resp.status_code == 409
        assert "another action is in progress (evaluate by scheduler" in resp.get_json()["error"]
        assert ctx.ledger.get(rid).phase is Phase.PROGRESSING
    assert (
        client.post(f"/api/rollouts/{rid}/rollback", headers=AUTH, json={"reason": "test"}).status_code == 200
    )


@pytest.mark.parametrize("rollout_id", ["999", str(2**31), str(2**63)])
def test_an_action_on_an_unknown_rollout_is_a_404_even_while_another_action_holds_the_lock(
    client, ctx, rollout_id
):
    start(client)
    ctx.action_lock.wait_s = 0.1
    with held_by_another_thread(ActionLock(ctx.engine), "start_canary by operator"):
        for action in ("pause", "resume", "promote", "rollback"):
            resp = client.post(f"/api/rollouts/{rollout_id}/{action}", headers=AUTH)
            assert resp.status_code == 404, (action, resp.get_json())
            assert f"rollout {rollout_id} does not exist" in resp.get_json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("PUT", "/api/traffic", {"weights": {"baseline": 2**31, "control": 5}}, 400),
        ("PUT", "/api/traffic", {"weights": {"nobody": 5}}, 400),
        ("POST", "/api/rollouts", {"version": 2**31 - 1}, 404),
        ("POST", "/api/rollouts", {"version": 3, "policy": {"steps": "x"}}, 400),
    ],
)
def test_input_refused_anyway_is_refused_without_waiting_for_the_action_lock(
    client, ctx, method, path, body, status
):
    ctx.action_lock.wait_s = 0.1
    with held_by_another_thread(ActionLock(ctx.engine), "start_canary by operator"):
        resp = client.open(path, method=method, json=body, headers=AUTH)
    assert resp.status_code == status, resp.get_json()
    assert "another action is in progress" not in resp.get_json()["error"]


def test_evaluate_runs_one_evaluation_of_the_active_rollout(client, ctx):
    rid = start(client)["id"]
    body = client.post(f"/api/rollouts/{rid}/evaluate", headers=AUTH).get_json()
    assert body["rollout"]["id"] == rid
    assert body["result"]["rollout_id"] == rid and body["result"]["action"]
    assert ctx.ledger.decisions(rid, 1)[0]["actor"] == "api"


def test_evaluate_refuses_a_rollout_that_is_not_active(client):
    rid = start(client)["id"]
    client.post(f"/api/rollouts/{rid}/rollback", headers=AUTH, json={"reason": "test"})
    resp = client.post(f"/api/rollouts/{rid}/evaluate", headers=AUTH)
    assert resp.status_code == 409 and "not the active rollout" in resp.get_json()["error"]
    assert client.post("/api/rollouts/77/evaluate", headers=AUTH).status_code == 404


def test_restore_previous_baseline(client, ctx):
    resp = client.post("/api/rollback", headers=AUTH)
    assert resp.status_code == 409 and "previous_baseline" in resp.get_json()["error"]
    rid = start(client)["id"]
    client.post(f"/api/rollouts/{rid}/promote", headers=AUTH, json={"reason": "test"})
    resp = client.post("/api/rollback", headers=AUTH)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["baseline"] == 1
    assert ctx.registry.version_for("baseline") == 1


# --- /metrics ----------------------------------------------------------------
def test_metrics_exports_rollout_state_from_the_database(client, ctx):
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2})
    services.close_labels(ctx)
    rid = start(client)["id"]
    client.post(f"/api/rollouts/{rid}/evaluate", headers=AUTH)
    client.get("/api/versions")
    text = client.get("/metrics").get_data(as_text=True)
    weight = ctx.router.get_weights()["canary"]
    assert f"recsys_canary_weight {float(weight)}" in text
    assert 'recsys_traffic_weight{role="baseline",version="1"}' in text
    assert f'recsys_rollout_phase{{phase="progressing",rollout_id="{rid}"}} 1.0' in text
    assert f'recsys_rollout_phase{{phase="paused",rollout_id="{rid}"}} 0.0' in text
    assert 'recsys_decisions_total{action="start"} 1.0' in text
    assert "recsys_rollout_last_evaluation_timestamp_seconds " in text
    assert 'recsys_label_coverage{role="baseline"}' in text
    assert 'recsys_accuracy{role="baseline"}' in text
    assert "recsys_control_plane_database_up 1.0" in text
    assert 'recsys_http_requests_total{endpoint="api.versions",status="200"} 1.0' in text


def test_metrics_still_answer_when_the_database_is_gone(tmp_path):
    from tests.conftest import free_port

    engine = make_engine(f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/gone")
    app = create_app(make_settings(tmp_path, "sqlite://"), _context_without_db(tmp_path, engine))
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    assert "recsys_control_plane_database_up 0.0" in resp.get_data(as_text=True)


def _context_without_db(tmp_path, engine):
    from control_plane.context import Context
    from control_plane.deployer.memory import InMemoryDeployer
    from control_plane.registry.memory import InMemoryRegistry
    from control_plane.traffic.memory import InMemoryRouter

    return Context(
        make_settings(tmp_path, "sqlite://"), engine, InMemoryRegistry(), InMemoryRouter(), InMemoryDeployer()
    )


def test_last_evaluation_statistics_are_flattened_into_gauges():
    from control_plane.web.metrics import flatten_numbers

    stats = {"p_value": 0.03, "lift": {"estimate": 0.02, "ci": [0.01, 0.03]}, "note": "x", "ok": None}
    assert dict(flatten_numbers(stats)) == {
        "p_value": 0.03,
        "lift.estimate": 0.02,
        "lift.ci.lo": 0.01,
        "lift.ci.hi": 0.03,
    }


def test_http_counters_use_multiprocess_files_when_gunicorn_asks(tmp_path):
    """Under PROMETHEUS_MULTIPROC_DIR (prometheus_client's, and the settings'), a second process sees the
    first one's request counts."""
    script = f"""
import sys
from control_plane.db.engine import make_engine, migrate
from control_plane.web import create_app
from tests.web_support import make_context, make_settings
url = "sqlite:///{tmp_path / "mp.db"}"
migrate(url)
from pathlib import Path
settings = make_settings(Path("{tmp_path}"), url, prometheus_multiproc_dir=Path("{tmp_path / "prom"}"))
ctx = make_context(settings, make_engine(url))
client = create_app(ctx=ctx).test_client()
client.get("/healthz")
if sys.argv[1] == "scrape":
    print(client.get("/metrics").get_data(as_text=True))
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    (tmp_path / "prom").mkdir()
    cwd = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    subprocess.run([sys.executable, "-c", script, "count"], env=env, cwd=cwd, check=True)
    out = subprocess.run(
        [sys.executable, "-c", script, "scrape"], env=env, cwd=cwd, check=True, capture_output=True, text=True
    ).stdout
    assert 'recsys_http_requests_total{endpoint="healthz",status="200"} 2.0' in out
    assert "recsys_canary_weight 0.0" in out


# --- logging -----------------------------------------------------------------
def test_the_request_id_is_echoed_and_logged_as_json(app, client):
    resp = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert (
        len(client.get("/healthz", headers={"X-Request-ID": "bad id <script>"}).headers["X-Request-ID"]) == 32
    )
    with app.test_request_context("/"):
        from flask import g

        g.request_id = "abc-123"
        record = logging.makeLogRecord(
            {
                "msg": "weights set",
                "levelno": 20,
                "levelname": "INFO",
                "name": "control_plane.services",
                "actor": "api",
            }
        )
        line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc-123" and line["actor"] == "api" and line["msg"] == "weights set"


# --- UI ----------------------------------------------------------------------
def test_the_page_shows_versions_rollout_ledger_and_charts_to_anyone(client, ctx):
    rollout = services.start_canary(ctx, 3, None, "test")
    html = client.get("/").get_data(as_text=True)
    assert 'id="versions"' in html and "v3" in html
    assert f"#{rollout.id}" in html and "progressing" in html
    assert 'id="ledger"' in html and "start" in html
    assert 'id="chart-p99"' in html and "chart.umd.min.js" in html
    assert 'id="operate"' not in html  # no forms for a reader
    assert "Log in to operate" in html


def test_a_wrong_password_is_refused(client):
    token = csrf_token(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"csrf_token": token, "password": "guess"})
    assert resp.status_code == 401 and "not the operator token" in resp.get_data(as_text=True)
    assert 'id="operate"' not in client.get("/").get_data(as_text=True)


def test_an_operator_rolls_back_the_canary_from_the_page(client, ctx):
    rollout = services.start_canary(ctx, 3, None, "test")
    log_in(client)
    html = client.get("/").get_data(as_text=True)
    assert 'id="operate"' in html and "Roll back now (override)" in html
    no_reason = client.post(f"/ui/rollouts/{rollout.id}/rollback", data={"csrf_token": csrf_token(html)})
    assert no_reason.status_code == 303 and ctx.ledger.get(rollout.id).phase is Phase.PROGRESSING
    assert "overrides the analysis: give a reason" in client.get("/").get_data(as_text=True)
    resp = client.post(
        f"/ui/rollouts/{rollout.id}/rollback",
        data={"csrf_token": csrf_token(html), "reason": "users complain"},
    )
    assert resp.status_code == 303
    assert ctx.ledger.get(rollout.id).phase is Phase.ROLLED_BACK
    row = ctx.ledger.decisions(rollout.id, 1)[0]
    assert row["actor"] == "ui:operator" and row["action"] == "override_rollback"
    assert row["stats"]["override"]["reason"] == "users complain"
    page = client.get("/").get_data(as_text=True)
    assert "rolled back" in page and "Override</strong> by ui:operator: users complain" in page


def test_an_operator_pauses_and_resumes_from_the_page_without_a_reason(client, ctx):
    rollout = services.start_canary(ctx, 3, None, "test")
    log_in(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    for action, phase, said in (("pause", Phase.PAUSED, "paused"), ("resume", Phase.PROGRESSING, "resumed")):
        resp = client.post(f"/ui/rollouts/{rollout.id}/{action}", data={"csrf_token": token})
        assert resp.status_code == 303 and ctx.ledger.get(rollout.id).phase is phase
        assert f"Rollout {rollout.id} {said}; it is now {phase}." in client.get("/").get_data(as_text=True)


def test_ui_forms_start_a_canary_and_set_weights(client, ctx):
    log_in(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    resp = client.post(
        "/ui/traffic", data={"csrf_token": token, "baseline": "90", "canary": "0", "control": "10"}
    )
    assert resp.status_code == 303
    assert ctx.router.get_weights() == {"baseline": 90, "canary": 0, "control": 10}
    resp = client.post("/ui/canary", data={"csrf_token": token, "version": "3", "policy": "threshold"})
    assert resp.status_code == 303
    assert ctx.ledger.active().candidate_version == 3 and ctx.ledger.active().policy == "threshold"


def test_a_refused_ui_action_shows_the_reason_on_the_page(client, ctx):
    log_in(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    resp = client.post("/ui/canary", data={"csrf_token": token, "version": "three", "policy": "sequential"})
    assert resp.status_code == 303
    html = client.get("/").get_data(as_text=True)
    assert "field &#39;version&#39; must be an integer" in html
    assert ctx.ledger.list() == []


def test_users_per_arm_in_the_api_the_page_and_prometheus(client, ctx):
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2}, users=4)
    services.close_labels(ctx)
    roles = client.get("/api/metrics?window_s=3600").get_json()["roles"]
    assert (roles["baseline"]["users"], roles["baseline"]["requests"]) == (4, 120)
    assert roles["canary"]["users"] is None
    scrape = client.get("/metrics").get_data(as_text=True)
    assert 'recsys_window_users{role="baseline"} 4.0' in scrape
    assert 'recsys_window_users{role="control"} 4.0' in scrape


def test_a_shadow_rollout_is_shown_on_the_page_in_the_api_and_in_prometheus(client, ctx):
    bad = client.post(
        "/api/rollouts",
        json={"version": 3, "policy": {"shadow_percent": 120}},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 400 and "shadow_percent" in bad.get_json()["error"]
    log_in(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    resp = client.post(
        "/ui/canary",
        data={"csrf_token": token, "version": "3", "policy": "sequential", "shadow_percent": "30"},
    )
    assert resp.status_code == 303
    rollout = ctx.ledger.active()
    assert rollout.phase is Phase.SHADOW and rollout.canary_weight == 0
    html = client.get("/").get_data(as_text=True)
    assert 'id="shadow-mirror"' in html and "30% of requests" in html
    assert client.get("/api/traffic").get_json()["shadow"] == {"version": 3, "percent": 30}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'recsys_shadow_mirror_percent{version="3"} 30.0' in metrics
    assert 'recsys_rollout_phase{phase="shadow",rollout_id="1"} 1.0' in metrics


def test_ranking_metrics_in_the_api_prometheus_and_the_decision_metric_on_the_page(client, ctx):
    seed_predictions(ctx.engine, {"baseline": 1, "control": 2}, recommend=True)
    services.close_labels(ctx)
    baseline = client.get("/api/metrics?window_s=3600").get_json()["roles"]["baseline"]
    ranking = baseline["ranking"]
    # every baseline answer is a /recommend: each closed one is an exposure; per minute i = 1, 3, 5 of
    # 6 clicked, at positions 2, 1, 3 (the newest minutes' windows are still open)
    n = ranking["exposures"]
    assert n == baseline["labelled"] >= 60 and abs(ranking["clicks"] - n / 2) <= 1
    assert ranking["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 6, abs=0.01)
    assert ranking["ctr_at_k"] == round(ranking["clicks"] / n, 6) and ranking["k"] == 10
    scrape = client.get("/metrics").get_data(as_text=True)
    assert f'recsys_window_exposures{{role="baseline"}} {float(n)}' in scrape
    assert f'recsys_ranking_metric{{metric="ctr_at_10",role="baseline"}} {ranking["ctr_at_k"]}' in scrape
    assert 'recsys_ranking_metric{metric="mrr",role="baseline"}' in scrape
    bad = client.post("/api/rollouts", json={"version": 3, "policy": {"metric": "clicks"}}, headers=AUTH)
    assert bad.status_code == 400 and "policy field metric must be one of" in bad.get_json()["error"]
    start(client, policy={"metric": "ctr_at_k", "metric_k": 3})
    page = client.get("/").get_data(as_text=True)
    assert '<dd id="decision-metric">CTR@3 of /recommend</dd>' in page


def test_the_page_and_the_api_show_the_shadow_phase_s_paired_differences(client, ctx):
    import numpy as np

    from control_plane.analysis.paired import Pair, paired_facts, summary

    rollout = services.start_canary(ctx, 3, None, "test")
    rng = np.random.default_rng(3)
    pairs = [
        Pair(float(b) + 0.02, float(b), 12.0, 10.0, 200, 200, outcome=int(b > 0.4))
        for b in rng.uniform(0.1, 0.9, 300)
    ]
    paired = summary(paired_facts(pairs), 0.05, 500)
    shadow = {
        "requests": {"shadow": 300, "baseline": 1500},
        "errors": {"shadow": 0.0, "baseline": 0.0},
        "latency": {"p99_canary": 12.0, "p99_baseline": 10.0, "ratio": 1.2},
        "paired": paired,
    }
    with ctx.engine.begin() as conn:
        ctx.ledger.record(
            conn,
            rollout_id=rollout.id,
            ts=rollout.started_at + 1,
            tick=1,
            phase_before="shadow",
            phase_after="shadow",
            action="hold",
            actor="controller",
            reason="shadow: holding",
            canary_weight=0,
            sample_sizes={},
            metrics={},
            rules=[],
            stats={"phase": "shadow", "shadow": shadow},
        )
    html = client.get("/").get_data(as_text=True)
    assert 'id="shadow-paired"' in html and "on 300 identical requests" in html
    assert "labelled pairs" in html  # the accuracy difference (every pair closed)
    got = client.get(f"/api/decisions?rollout_id={rollout.id}", headers=AUTH).get_json()["decisions"][0]
    assert got["stats"]["shadow"]["paired"]["score"]["mean_diff"] == pytest.approx(0.02)
    assert got["stats"]["shadow"]["paired"]["accuracy"]["n"] == 300
