"""Bad input to the control plane, systematically: generated bodies, query strings and forms, on real
Postgres and on SQLite (the embedded default), each database's own limits in play.

The control plane has no OpenAPI document, so Hypothesis generates the input and the Flask test client sends
it. For every case: no 5xx; every 4xx carries a message; a refused write changes nothing (traffic, rollouts,
ledger, registry, router, deployer, labels). About 1,300 generated cases a database plus the fixed ones
below, among them the hostile classes of issue 25: nesting 100,000 deep, large label bodies that look
valid, lone surrogates and NULs, ids and versions at and past integer limits.
"""

from __future__ import annotations

import hashlib
import io
import json
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text

from control_plane import services
from control_plane.analysis.policy import Policy
from control_plane.bounds import MAX_JSON_DEPTH, MAX_ROW_INT
from control_plane.db.engine import make_engine, migrate
from control_plane.db.schema import decisions, labels, predictions, rollouts, traffic_config
from control_plane.settings import ROLES
from control_plane.web import create_app
from tests.web_support import (
    LABEL_HEADERS,
    TOKEN,
    csrf_token,
    issued_id,
    log_in,
    make_context,
    make_settings,
    seed_predictions,
    snapshot,
)

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def credentials_for(path: str) -> dict[str, str]:
    """Labels take the label-ingest token, everything else the operator's."""
    return LABEL_HEADERS if path == "/feedback" else AUTH


FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TABLES = (predictions, labels, traffic_config, rollouts, decisions)
INJECTIONS = [
    "1 OR 1=1",
    "1; DROP TABLE predictions; --",
    "' OR '1'='1",
    "1' UNION SELECT request_id FROM labels --",
    "1); DELETE FROM decisions; --",
    "$$; TRUNCATE rollouts; $$",
    "1::text",
    "\\x00",
    "%00",
    "1e400",
    "-0",
    "9" * 40,
    "1 AND pg_sleep(5) IS NULL",
]
# Text no database here stores (Postgres refuses NUL; a lone surrogate has no UTF-8 form).
UNSTORABLE = ["\ud800", "a\udfffb", "\x00", "id\x00", "\udbff"]
INT_LIMITS = [2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30]

# JSON-ish values, from the plausible to the hostile.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 120)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(INJECTIONS)
    | st.sampled_from(UNSTORABLE)
    | st.sampled_from(INT_LIMITS)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
role_keys = st.sampled_from([*ROLES, "Baseline", "canary ", "", "shadow", "__proto__"]) | st.text(max_size=12)


class World:
    """The app over a real database, with in-memory registry, router and deployer (versions 1-3)."""

    def __init__(self, url: str, state_dir) -> None:
        self.engine = make_engine(url)
        self.state_dir = state_dir
        self.reset()

    def reset(self) -> None:
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text(
                        "TRUNCATE predictions, labels, traffic_config, decisions, rollouts RESTART IDENTITY CASCADE"
                    )
                )
            else:
                for table in reversed(TABLES):  # decisions before the rollouts they point at
                    conn.execute(table.delete())
        self.ctx = make_context(make_settings(self.state_dir, str(self.engine.url)), self.engine)
        self.app = create_app(ctx=self.ctx)
        self.client = self.app.test_client()
        seed_predictions(self.engine, {"baseline": 1, "control": 2}, minutes=3, per_minute=3)

    def state(self) -> tuple:
        with self.engine.connect() as conn:
            digest = {
                t.name: hashlib.sha256(
                    json.dumps(
                        [list(map(str, r)) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
                    ).encode()
                ).hexdigest()
                for t in TABLES
            }
        return snapshot(self.ctx), digest


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def world(request, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("fuzz")
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{state_dir / 'recsys.db'}"
        migrate(url)
    w = World(url, state_dir)
    yield w
    w.engine.dispose()


def check(resp, world: World, before, *, changed_ok: bool) -> None:
    """No 5xx; a 4xx names its reason; a refused request changes nothing."""
    status, body = resp.status_code, resp.get_data(as_text=True)
    assert status < 500, f"{status}: {body[:300]}"
    if 400 <= status < 500:
        if resp.is_json:
            error = resp.get_json().get("error")
            assert isinstance(error, str) and error.strip(), body[:300]
        else:
            assert resp.mimetype == "text/html" and len(body.strip()) > 0
    if status >= 400 or not changed_ok:
        assert world.state() == before, f"refused with {status} but something changed"
    elif status < 300 and changed_ok and world.state() != before:
        world.reset()  # an accepted write: start the next case from the same place


def _send(world: World, method: str, path: str, body, *, raw: bool = False, headers=None):
    data = body if raw else json.dumps(body, allow_nan=True)
    return world.client.open(
        path, method=method, data=data, headers={**AUTH, **(headers or {})}, content_type="application/json"
    )


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {
            "weights": st.dictionaries(role_keys, values | st.integers(-5, 200), max_size=4)
            | st.fixed_dictionaries(
                {},
                optional=dict.fromkeys(("baseline", "control"), st.integers(-5, 200) | st.integers(0, 2**70)),
            )
        }
    )
    | values
)
@example(body={"weights": {"baseline": 2**40, "control": 5}})  # past what the database column holds
def test_traffic_writes_refuse_bad_weights_and_roles_with_a_message(world, body):
    before = world.state()
    check(_send(world, "PUT", "/api/traffic", body), world, before, changed_ok=True)


@FUZZ
@given(
    body=st.fixed_dictionaries(
        {"version": values | st.integers(-3, 10)},
        optional={
            "policy": st.none()
            | st.dictionaries(
                st.sampled_from([f.name for f in Policy.__dataclass_fields__.values()]) | st.text(max_size=8),
                values,
                max_size=4,
            )
        },
    )
    | values
)
def test_starting_a_rollout_refuses_bad_versions_and_policies_with_a_message(world, body):
    before = world.state()
    check(_send(world, "POST", "/api/rollouts", body), world, before, changed_ok=True)


@settings(FUZZ, max_examples=150)
@given(
    body=values
    | st.lists(st.fixed_dictionaries({"request_id": values, "label": values}), max_size=3)
    | st.fixed_dictionaries(
        {"request_id": st.text(max_size=200) | st.sampled_from(INJECTIONS), "label": values}
    )
)
def test_labels_refuse_bad_bodies_with_a_message(world, body):
    before = world.state()
    resp = world.client.post(
        "/feedback",
        data=json.dumps(body, allow_nan=True),
        content_type="application/json",
        headers=LABEL_HEADERS,
    )
    check(resp, world, before, changed_ok=True)


@settings(FUZZ, max_examples=150)
@given(
    raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
    path=st.sampled_from(["/api/traffic", "/api/rollouts", "/feedback", "/api/rollouts/1/pause"]),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)
def test_bodies_that_are_not_json_are_refused_with_a_message(world, raw, path, content_type):
    before = world.state()
    resp = world.client.post(path, data=raw, headers=credentials_for(path), content_type=content_type or None)
    check(resp, world, before, changed_ok=True)


@settings(FUZZ, max_examples=150)
@given(
    rollout_id=st.integers(-5, 2**40).map(str)
    | st.sampled_from(INJECTIONS)
    | st.text(string.printable, max_size=10),
    action=st.sampled_from(["pause", "resume", "promote", "rollback", "evaluate", "delete", "PAUSE"]),
)
def test_operator_actions_on_unknown_or_malformed_rollouts_change_nothing(world, rollout_id, action):
    from urllib.parse import quote

    before = world.state()
    resp = world.client.post(f"/api/rollouts/{quote(rollout_id, safe='')}/{action}", headers=AUTH)
    check(resp, world, before, changed_ok=rollout_id == "1")


QUERY_PARAMS = {
    "/api/rollouts": ["limit"],
    "/api/decisions": ["rollout_id", "limit"],
    "/api/metrics": ["window_s"],
    "/api/timeseries": ["window_s", "bucket_s"],
}


@settings(FUZZ, max_examples=300)
@given(path=st.sampled_from(sorted(QUERY_PARAMS)), data=st.data())
def test_query_parameters_out_of_range_are_refused_with_a_message(world, path, data):
    params = {
        p: data.draw(
            st.integers(-(2**65), 2**65).map(str) | st.sampled_from(INJECTIONS) | st.text(max_size=12),
            label=p,
        )
        for p in QUERY_PARAMS[path]
    }
    before = world.state()
    resp = world.client.get(path, query_string=params)
    check(resp, world, before, changed_ok=False)


@settings(FUZZ, max_examples=60)
@given(
    form=st.fixed_dictionaries(
        {role: st.text(max_size=8) | st.integers(-5, 2**40).map(str) for role in ROLES}
    ),
    canary=st.fixed_dictionaries(
        {
            "version": st.text(max_size=8) | st.integers(-3, 2**40).map(str),
            "policy": st.text(max_size=12) | st.sampled_from(["sequential", "threshold"]),
        }
    ),
)
def test_ui_forms_refuse_bad_values_with_a_message(world, form, canary):
    client = world.app.test_client()
    log_in(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    for path, fields in (("/ui/traffic", form), ("/ui/canary", canary)):
        before = world.state()
        resp = client.post(path, data={**fields, "csrf_token": token})
        assert resp.status_code in (303, 400, 404, 409), resp.status_code  # refusals come back as a flash
        if resp.status_code == 303:
            page = client.get("/").get_data(as_text=True)
            if 'class="flash flash-error"' in page:  # refused, and the page says why
                assert world.state() == before
            elif world.state() != before:  # accepted
                world.reset()
                return
        else:
            assert world.state() == before


# --- fixed cases ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, words",
    [
        ({"baseline": -1, "control": 5}, "must not be negative"),
        ({"baseline": 1.5, "control": 5}, "must be an integer"),
        ({"baseline": "90", "control": 10}, "must be an integer"),
        ({"baseline": True}, "must be an integer"),
        ({"baseline": 0, "canary": 0, "control": 0}, "positive"),
        ({"shadow": 5, "baseline": 95}, "unknown role"),
        ({"baseline": 50, "canary": 50}, "no deployed version"),
        ({"baseline": 2**31, "control": 5}, "baseline"),
        ({"baseline": 10**30}, "baseline"),
    ],
)
def test_weights_out_of_range_are_refused_with_a_message_and_change_nothing(world, weights, words):
    world.reset()
    before = world.state()
    resp = _send(world, "PUT", "/api/traffic", {"weights": weights})
    assert resp.status_code == 400 and words in resp.get_json()["error"], resp.get_data(as_text=True)
    assert world.state() == before


@pytest.mark.parametrize(
    "version, status, words",
    [
        (0, 400, "between 1 and 2147483647, got 0"),
        (-1, 400, "between 1 and 2147483647, got -1"),
        (99, 404, "99"),
        (2**63, 400, f"between 1 and {2**31 - 1}, got {2**63}"),
        ("3", 400, "integer"),
        (3.0, 400, "integer"),
        (True, 400, "integer"),
        (None, 400, "integer"),
        (1, 400, "already the baseline"),
    ],
)
def test_versions_out_of_range_are_refused_with_a_message_and_change_nothing(world, version, status, words):
    world.reset()
    before = world.state()
    resp = _send(world, "POST", "/api/rollouts", {"version": version})
    assert resp.status_code == status and words in resp.get_json()["error"], resp.get_data(as_text=True)
    assert world.state() == before


def test_each_query_parameter_ignores_sql_injection(world):
    world.reset()
    services.start_canary(world.ctx, 3, None, "test")
    before = world.state()
    for path, params in QUERY_PARAMS.items():
        for param in params:
            for attack in INJECTIONS:
                resp = world.client.get(path, query_string={param: attack})
                assert resp.status_code == 400 and param in resp.get_json()["error"], (path, param, attack)
        for attack in INJECTIONS:
            assert world.client.get(f"/api/rollouts/{attack}").status_code == 404
    assert world.state() == before
    with world.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(predictions)).scalar_one() > 0


def test_an_injection_in_a_label_is_stored_as_text_and_touches_nothing_else(world):
    world.reset()
    attack = issued_id("x'); DELETE FROM predictions; --")  # signed: the id check lets it through
    with world.engine.connect() as conn:
        counts = [conn.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES]
    resp = world.client.post("/feedback", json={"request_id": attack, "label": 1}, headers=LABEL_HEADERS)
    assert resp.status_code == 200
    with world.engine.connect() as conn:
        after = [conn.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES]
        stored = conn.execute(select(labels.c.label).where(labels.c.request_id == attack)).scalar_one()
    assert stored == 1 and after[1] == counts[1] + 1 and after[:1] + after[2:] == counts[:1] + counts[2:]


class CountingStream(io.RawIOBase):
    """A request body that counts what the server reads of it."""

    def __init__(self, size: int) -> None:
        self.size, self.pos, self.read_bytes = size, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # werkzeug's test client measures the body by seeking; that reads nothing

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        buf[:n] = b"x" * n
        self.pos += n
        self.read_bytes += n
        return n


@pytest.mark.parametrize("path", ["/api/traffic", "/api/rollouts", "/feedback"])
def test_an_oversized_body_is_refused_before_it_is_read(world, path):
    world.reset()
    limit = world.ctx.settings.max_body_bytes
    before = world.state()
    stream = CountingStream(50 * limit)
    resp = world.client.post(
        path,
        input_stream=stream,
        content_length=50 * limit,
        headers=credentials_for(path),
        content_type="application/json",
    )
    assert resp.status_code == 413 and resp.get_json()["error"]
    assert stream.read_bytes == 0, f"read {stream.read_bytes} bytes of a refused body"
    assert world.state() == before


# --- the hostile classes (issue 25), on both databases ------------------------------------------------
def _raw(world: World, method: str, path: str, raw: bytes, *, auth: bool = True):
    return world.client.open(
        path,
        method=method,
        data=raw,
        headers=credentials_for(path) if auth else {},
        content_type="application/json",
    )


DEEP = 100_000
DEEP_BODIES = {
    "bare": "[" * DEEP,
    "closed": "[" * DEEP + "]" * DEEP,
    "inside labels": '{"labels": ' + "[" * 5_000 + "]" * 5_000 + "}",
    "inside a field": '{"request_id": ' + "[" * DEEP + ', "label": 1}',
    "objects": '{"a": ' * DEEP + "1" + "}" * DEEP,
    "just past the limit": "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
}


@pytest.mark.parametrize("shape", sorted(DEEP_BODIES))
@pytest.mark.parametrize(
    "method, path", [("POST", "/feedback"), ("PUT", "/api/traffic"), ("POST", "/api/rollouts")]
)
def test_deep_nesting_is_refused_naming_the_depth_and_changes_nothing(world, shape, method, path):
    world.reset()
    before = world.state()
    resp = _raw(world, method, path, DEEP_BODIES[shape].encode())
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert f"the limit is {MAX_JSON_DEPTH}" in resp.get_json()["error"]
    assert world.state() == before


def test_a_policy_nested_past_the_limit_is_refused_before_the_registry_is_asked(world):
    world.reset()
    before = world.state()
    policy = '{"name": "sequential", "steps": ' + "[" * 40 + "10" + "]" * 40 + "}"
    resp = _raw(world, "POST", "/api/rollouts", f'{{"version": 3, "policy": {policy}}}'.encode())
    assert resp.status_code == 400 and "levels deep" in resp.get_json()["error"]
    assert world.state() == before


def test_a_thousand_labels_with_the_longest_ids_near_the_body_limit_are_all_stored(world):
    world.reset()
    ids = [issued_id(f"{i:070x}") for i in range(1000)]  # the longest an issued id can be
    assert {len(rid) for rid in ids} == {128}
    body = json.dumps({"labels": [{"request_id": rid, "label": i % 2} for i, rid in enumerate(ids)]})
    body = body[:-1] + " " * (world.ctx.settings.max_body_bytes - 10_000 - len(body)) + "}"
    resp = _raw(world, "POST", "/feedback", body.encode())
    assert resp.status_code == 200 and resp.get_json() == {"accepted": 1000, "stored": "stored"}
    with world.engine.connect() as conn:
        stored = dict(conn.execute(select(labels.c.request_id, labels.c.label)).all())
    assert {rid: stored.get(rid) for rid in ids} == {rid: i % 2 for i, rid in enumerate(ids)}


@pytest.mark.parametrize(
    "body, words",
    [
        ([{"request_id": f"{i:032x}", "label": 1} for i in range(1001)], "too many labels"),
        ({"request_id": "a" * 129, "label": 1}, "longer than 128"),
        ({"labels": [{"request_id": "a", "label": 1}] * 999 + [{"request_id": "b", "label": 2}]}, "0 or 1"),
    ],
)
def test_label_bodies_just_past_a_limit_store_none_of_their_labels(world, body, words):
    world.reset()
    before = world.state()
    resp = _raw(world, "POST", "/feedback", json.dumps(body).encode())
    assert resp.status_code == 400 and words in resp.get_json()["error"]
    assert world.state() == before


SURROGATE_BODIES = {
    "escaped surrogate in an id": b'{"request_id": "\\ud800", "label": 1}',
    "escaped low surrogate in a batch": b'[{"request_id": "ok", "label": 1}, {"request_id": "x\\udfff", "label": 0}]',
    "raw surrogate bytes": '{"request_id": "\ud800", "label": 1}'.encode("utf-8", "surrogatepass"),
    "NUL in an id": b'{"request_id": "a\\u0000b", "label": 1}',
    "NUL alone": b'{"labels": [{"request_id": "\\u0000", "label": 1}]}',
    "NUL in a key": b'{"request_id": "a", "label": 1, "\\u0000": 1}',
}


@pytest.mark.parametrize("case", sorted(SURROGATE_BODIES))
def test_labels_with_text_a_database_refuses_are_refused_at_the_edge(world, case):
    world.reset()
    before = world.state()
    resp = _raw(world, "POST", "/feedback", SURROGATE_BODIES[case])
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert "NUL character or a lone UTF-16 surrogate" in resp.get_json()["error"]
    assert world.state() == before


@pytest.mark.parametrize("text_", UNSTORABLE)
@pytest.mark.parametrize(
    "method, path, template",
    [
        ("POST", "/api/rollouts", '{{"version": 3, "policy": {{"name": {}}}}}'),
        ("POST", "/api/rollouts", '{{"version": 3, "policy": {{{}: 1}}}}'),
        ("PUT", "/api/traffic", '{{"weights": {{{}: 5, "baseline": 95}}}}'),
    ],
)
def test_operator_writes_with_text_a_database_refuses_change_nothing(world, text_, method, path, template):
    world.reset()
    before = world.state()
    resp = _raw(world, method, path, template.format(json.dumps(text_)).encode())
    assert resp.status_code == 400 and "cannot be stored" in resp.get_json()["error"]
    assert world.state() == before


@pytest.mark.parametrize("rollout_id", [*INT_LIMITS, 0, 10**4000])
def test_rollout_ids_at_and_past_integer_limits_do_not_exist(world, rollout_id):
    world.reset()
    services.start_canary(world.ctx, 3, None, "test")
    before = world.state()
    resp = world.client.get(f"/api/rollouts/{rollout_id}")
    assert resp.status_code == 404, resp.get_data(as_text=True)[:300]
    for action in ("pause", "resume", "promote", "rollback", "evaluate"):
        resp = world.client.post(f"/api/rollouts/{rollout_id}/{action}", headers=AUTH)
        assert resp.status_code == 404, (action, resp.get_data(as_text=True)[:300])
        assert resp.get_json()["error"]
    resp = world.client.get("/api/decisions", query_string={"rollout_id": str(rollout_id)})
    assert resp.status_code in (200, 400) and (resp.status_code == 200) == (1 <= rollout_id <= MAX_ROW_INT)
    assert world.state() == before


@pytest.mark.parametrize("version", INT_LIMITS[1:] + [-(2**63), 10**4000])
def test_versions_past_what_a_column_holds_never_reach_the_registry(world, version):
    world.reset()
    before = world.state()
    asked = []
    original = world.ctx.registry.get
    world.ctx.registry.get = lambda v: asked.append(v) or original(v)
    try:
        resp = _raw(world, "POST", "/api/rollouts", f'{{"version": {version}}}'.encode())
    finally:
        world.ctx.registry.get = original
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert asked == [] and world.state() == before
    error = resp.get_json()["error"]
    assert str(MAX_ROW_INT) in error or "not valid JSON" in error or "positive" in error


def test_the_largest_version_a_column_holds_is_looked_up_and_not_found(world):
    world.reset()
    before = world.state()
    resp = _raw(world, "POST", "/api/rollouts", f'{{"version": {MAX_ROW_INT}}}'.encode())
    assert resp.status_code == 404 and str(MAX_ROW_INT) in resp.get_json()["error"]
    assert world.state() == before
