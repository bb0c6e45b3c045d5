"""Only the operator changes things: every write route, enumerated from the app, refuses anyone else."""

from __future__ import annotations

import logging
import stat

import pytest
from werkzeug.routing import BuildError

from control_plane import services
from control_plane.credentials import (
    ensure_api_token,
    ensure_label_token,
    ensure_redis_password,
    ensure_request_id_key,
    ensure_secret_key,
)
from control_plane.db.engine import make_engine, migrate
from control_plane.web import create_app
from control_plane.web.auth import WRITE_METHODS
from tests.web_support import (
    LABEL_HEADERS,
    TOKEN,
    csrf_token,
    issued_id,
    log_in,
    make_context,
    make_settings,
    snapshot,
)

# Sample values for every URL argument a write route takes; a new argument must be added here.
SAMPLE_ARGS = {
    "rollout_id": [1],
    "action": ["pause", "resume", "promote", "rollback", "evaluate"],
}
# Writes that are open by design (none yet); anything else must refuse an anonymous caller.
PUBLIC_WRITES: set[str] = set()  # /feedback too: labels need the label-ingest token


@pytest.fixture
def ctx(tmp_path):
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    migrate(url)
    engine = make_engine(url)
    ctx = make_context(make_settings(tmp_path / "state", url), engine)
    services.start_canary(ctx, 3, None, "test")  # so that every rollout action would change something
    yield ctx
    engine.dispose()


@pytest.fixture
def app(ctx):
    return create_app(ctx=ctx)


def write_requests(app) -> list[tuple[str, str]]:
    """(method, url) for every write route the app has, with every value its arguments accept."""
    adapter = app.url_map.bind("localhost")
    out = []
    for rule in app.url_map.iter_rules():
        methods = sorted((rule.methods or set()) & WRITE_METHODS)
        if not methods or rule.endpoint in PUBLIC_WRITES:
            continue
        unknown = set(rule.arguments) - set(SAMPLE_ARGS)
        assert not unknown, f"{rule.rule}: add sample values for {unknown} to SAMPLE_ARGS"
        combos = [{}]
        for arg in sorted(rule.arguments):
            combos = [{**c, arg: v} for c in combos for v in SAMPLE_ARGS[arg]]
        for values in combos:
            try:
                url = adapter.build(rule.endpoint, values)
            except (BuildError, ValueError):
                continue  # e.g. action=evaluate is its own rule
            if adapter.match(url, method=methods[0])[0] != rule.endpoint:
                continue
            out.extend((m, url) for m in methods)
    return out


def test_the_enumeration_finds_every_kind_of_write(app):
    urls = {u for _, u in write_requests(app)}
    for expected in (
        "/api/traffic",
        "/api/rollouts",
        "/api/rollouts/1/rollback",
        "/api/rollouts/1/evaluate",
        "/api/rollback",
        "/ui/canary",
        "/ui/traffic",
        "/ui/rollouts/1/promote",
        "/ui/rollback",
        "/login",
        "/logout",
        "/feedback",
    ):
        assert expected in urls


def test_the_operator_token_does_not_label_and_the_label_token_does_not_operate(app, ctx):
    client = app.test_client()
    before = snapshot(ctx)
    label = {"request_id": issued_id(), "label": 1}
    as_operator = client.post("/feedback", json=label, headers={"Authorization": f"Bearer {TOKEN}"})
    assert as_operator.status_code == 401 and "label-ingest token" in as_operator.get_json()["error"]
    as_labeller = client.post("/api/traffic", json={"weights": {"baseline": 100}}, headers=LABEL_HEADERS)
    assert as_labeller.status_code == 401
    assert snapshot(ctx) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TOKEN}"},
    ],
)
def test_every_write_refuses_a_caller_without_the_token_and_changes_nothing(app, ctx, headers):
    client = app.test_client()
    before = snapshot(ctx)
    for method, url in write_requests(app):
        resp = client.open(
            url, method=method, json={"weights": {"baseline": 100}, "version": 3}, headers=headers
        )
        assert resp.status_code in (401, 403), f"{method} {url} answered {resp.status_code}"
        if url.startswith("/api/"):
            assert resp.status_code == 401 and "error" in resp.get_json()
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert snapshot(ctx) == before


def test_ui_writes_with_a_valid_csrf_token_but_no_login_are_401(app, ctx):
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    before = snapshot(ctx)
    for method, url in write_requests(app):
        if url.startswith("/api/") or url in ("/login", "/logout"):
            continue
        resp = client.open(
            url, method=method, data={"csrf_token": token, "version": "3", "policy": "sequential"}
        )
        assert resp.status_code == 401, f"{method} {url} answered {resp.status_code}"
    assert snapshot(ctx) == before


def test_a_logged_in_form_post_without_the_csrf_token_is_refused(app, ctx):
    client = app.test_client()
    log_in(client)
    rollout = ctx.ledger.active()
    before = snapshot(ctx)
    resp = client.post(f"/ui/rollouts/{rollout.id}/rollback", data={})
    assert resp.status_code == 403
    assert "CSRF" in resp.get_data(as_text=True)
    resp = client.post(f"/ui/rollouts/{rollout.id}/rollback", data={"csrf_token": "forged"})
    assert resp.status_code == 403
    assert snapshot(ctx) == before


def test_the_login_form_itself_needs_the_csrf_token(app):
    resp = app.test_client().post("/login", data={"password": TOKEN})
    assert resp.status_code == 403


def test_the_api_with_the_bearer_token_needs_no_csrf_token(app, ctx):
    rollout = ctx.ledger.active()
    resp = app.test_client().post(
        f"/api/rollouts/{rollout.id}/pause", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert resp.status_code == 200


def test_a_ui_session_does_not_authorise_the_api(app, ctx):
    client = app.test_client()
    log_in(client)
    before = snapshot(ctx)
    assert client.post(f"/api/rollouts/{ctx.ledger.active().id}/rollback").status_code == 401
    assert snapshot(ctx) == before


def test_the_bearer_token_is_compared_in_constant_time(app, monkeypatch):
    import control_plane.web.auth as auth

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    app.test_client().post("/api/rollback", headers={"Authorization": "Bearer nope"})
    assert (b"nope", TOKEN.encode()) in calls


def test_rotating_the_token_ends_ui_sessions(tmp_path, ctx):
    import dataclasses

    client = create_app(ctx=ctx).test_client()
    log_in(client)
    rotated = create_app(dataclasses.replace(ctx.settings, api_token="a-new-token-abcdefghijkl"), ctx)
    with client.session_transaction() as sess:
        cookie_session = dict(sess)
    other = rotated.test_client()
    with other.session_transaction() as sess:
        sess.update(cookie_session)
    assert 'id="operate"' not in other.get("/").get_data(as_text=True)


def test_secrets_never_appear_in_pages_or_logs(app, ctx, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    log_in(client)
    pages = [
        client.get(p).get_data(as_text=True) for p in ("/", "/login", "/api/versions", "/metrics", "/nope")
    ]
    client.post("/api/rollback", headers={"Authorization": f"Bearer {TOKEN}x"})
    secret_key = app.config["SECRET_KEY"]
    for text in [*pages, caplog.text, *(str(vars(r)) for r in caplog.records)]:
        assert TOKEN not in text
        assert secret_key not in text


# --- the credential files ---------------------------------------------------------
def test_the_api_token_file_is_created_0600_once_and_reused(tmp_path):
    settings = make_settings(tmp_path / "state", api_token="")
    token = ensure_api_token(settings)
    path = tmp_path / "state" / "api-token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_api_token(settings) == token
    assert [p.name for p in path.parent.iterdir()] == ["api-token"]  # no temp files left behind


def test_a_token_in_settings_wins_and_no_file_is_written(tmp_path):
    settings = make_settings(tmp_path / "state", api_token="from-env-0123456789")
    assert ensure_api_token(settings) == "from-env-0123456789"
    assert not (tmp_path / "state" / "api-token").exists()


@pytest.mark.parametrize(
    ("ensure", "name"),
    [
        (ensure_label_token, "label-token"),
        (ensure_request_id_key, "request-id-key"),
        (ensure_redis_password, "redis-password"),
    ],
)
def test_each_stack_secret_is_its_own_0600_file_unless_the_environment_gives_it(tmp_path, ensure, name):
    settings = make_settings(tmp_path / "state", label_token="", request_id_key="")
    value = ensure(settings)
    path = tmp_path / "state" / name
    assert len(value) >= 32 and path.read_text().strip() == value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and ensure(settings) == value
    assert value != ensure_api_token(settings)
    field = {
        "label-token": "label_token",
        "request-id-key": "request_id_key",
        "redis-password": "redis_password",
    }
    assert (
        ensure(make_settings(tmp_path / "other", **{field[name]: "given-0123456789"})) == "given-0123456789"
    )
    assert not (tmp_path / "other" / name).exists()


def test_the_session_secret_key_file_is_created_0600(tmp_path):
    settings = make_settings(tmp_path / "state")
    key = ensure_secret_key(settings)
    path = tmp_path / "state" / "secret-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secret_key(settings) == key
    assert create_app(settings).config["SECRET_KEY"] == key
