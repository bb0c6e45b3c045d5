"""The local stack for real: Traefik over three `bentoml serve`, logging to the embedded database."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from control_plane.db.engine import make_engine
from control_plane.db.schema import labels, predictions
from tests.conftest import post_large

pytestmark = pytest.mark.e2e
FEATURES = [0.1 * i for i in range(16)]


def logged(stack, request_ids: list[str], timeout_s: float = 30) -> dict[str, tuple[int, str]]:
    """request id -> (model_version, route) for the ids whose rows have landed (waits for all of them)."""
    engine = make_engine(stack.settings().database_url)
    deadline = time.monotonic() + timeout_s
    found: dict[str, tuple[int, str]] = {}
    wanted = set(request_ids)
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                for chunk in range(0, len(request_ids), 500):
                    ids = request_ids[chunk : chunk + 500]
                    rows = conn.execute(
                        select(
                            predictions.c.request_id, predictions.c.model_version, predictions.c.route
                        ).where(predictions.c.request_id.in_(ids))
                    ).all()
                    found.update({r[0]: (r[1], r[2]) for r in rows})
            if wanted <= set(found):
                break
            time.sleep(0.5)
    finally:
        engine.dispose()
    return found


def predict_many(stack, n: int, headers: dict | None = None, workers: int = 8) -> list[tuple[str, int, dict]]:
    def one(_):
        status, hdrs, body = stack.post(
            f"{stack.gateway}/predict",
            {"features": FEATURES},
            {"X-Request-ID": uuid.uuid4().hex, **(headers or {})},
        )
        return hdrs.get("X-Request-Id", ""), status, body  # the id the Bento issued

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def set_weights(stack, weights: dict[str, int]) -> dict:
    status, _, body = stack.post(
        f"{stack.control_plane}/api/traffic", {"weights": weights}, {"Authorization": f"Bearer {stack.token}"}
    )
    assert status == 200, body
    return body


def test_recsys_up_reports_every_process_and_version(stack):
    assert "gateway" in stack.up_output and "api-token" in stack.up_output
    st = json.loads(stack.recsys("status", "--json").stdout)
    states = {name: p["state"] for name, p in st["processes"].items()}
    for name in ("traefik", "control-plane", "worker", "scheduler", "redis", "mlflow"):
        assert states.get(name) == "RUNNING", states
    roles = {v["role"]: v for v in st["versions"]}
    assert {r: (v["version"], v["weight"], v["healthy"]) for r, v in roles.items()} == {
        "control": (1, 5, True),
        "baseline": (2, 85, True),
        "canary": (3, 10, True),
    }
    # each Bento's prediction log: nothing lost or set aside, database and spill disk working
    for v in roles.values():
        assert v["log"]["rows_lost"] == 0 and v["log"]["db_up"] and v["log"]["disk_ok"], v
    assert st["dead_letter_rows"] == 0
    human = stack.recsys("status").stdout
    assert "baseline" in human and "ready" in human
    assert "prediction log" in human and "dead-letter rows" in human


def test_each_response_says_which_version_and_role_served_it(stack):
    status, headers, body = stack.post(
        f"{stack.gateway}/predict", {"features": FEATURES}, {"X-Request-ID": "hello-1"}
    )
    assert status == 200
    assert body["request_id"] == headers["X-Request-Id"] and body["request_id"].startswith("hello-1.")
    assert int(headers["X-Model-Version"]) == body["model_version"]
    assert headers["X-Model-Role"] == body["role"]
    assert {1: "control", 2: "baseline", 3: "canary"}[body["model_version"]] == body["role"]


def test_the_default_split_holds_within_one_point_over_2000_logged_requests(stack):
    results = predict_many(stack, 2000)
    ok = [rid for rid, status, _ in results if status == 200]
    assert len(ok) == 2000, {s for _, s, _ in results}
    rows = logged(stack, ok)
    assert set(rows) == set(ok), f"{len(set(ok) - set(rows))} served predictions have no row"
    counts = {v: sum(1 for ver, _ in rows.values() if ver == v) for v in (1, 2, 3)}
    shares = {v: 100 * c / len(ok) for v, c in counts.items()}
    assert abs(shares[2] - 85) <= 1 and abs(shares[3] - 10) <= 1 and abs(shares[1] - 5) <= 1, shares
    assert {route for _, route in rows.values()} == {"weighted"}


def test_tester_overrides_reach_the_named_version_and_are_marked_in_the_log(stack):
    by_version = predict_many(stack, 20, {"X-Model-Version": "1"}, workers=4)
    by_role = predict_many(stack, 20, {"X-Model-Role": "canary"}, workers=4)
    assert {body["model_version"] for _, _, body in by_version} == {1}
    assert {body["model_version"] for _, _, body in by_role} == {3}
    rows = logged(stack, [rid for rid, _, _ in by_version + by_role])
    assert {route for _, route in rows.values()} == {"override"}


def test_new_weights_are_in_force_within_two_seconds(stack):
    set_weights(stack, {"baseline": 0, "canary": 100, "control": 0})
    try:
        time.sleep(2)
        results = predict_many(stack, 200)
        assert {body["model_version"] for _, status, body in results if status == 200} == {3}
    finally:
        set_weights(stack, {"baseline": 85, "canary": 10, "control": 5})
        time.sleep(2)


def test_bad_input_through_the_gateway_gets_a_4xx_with_a_message(stack):
    for body in ({"features": [1.0] * 15}, {"features": ["a"] * 16}, {"features": None}, {}):
        status, _, answer = stack.post(f"{stack.gateway}/predict", body)
        assert 400 <= status < 500, (body, status, answer)
        assert answer and json.dumps(answer), answer
    status, _, answer = stack.post(f"{stack.gateway}/recommend", {"candidates": [], "k": 1})
    assert 400 <= status < 500
    big = {"features": FEATURES, "pad": "x" * (stack.settings().max_body_bytes + 10)}
    assert post_large(f"{stack.gateway}/predict", json.dumps(big).encode()) == 413


def test_one_request_id_follows_a_request_from_the_gateway_to_its_label(stack):
    sent = f"trace-{uuid.uuid4().hex}"
    status, headers, body = stack.post(
        f"{stack.gateway}/predict", {"features": FEATURES}, {"X-Request-ID": sent}
    )
    rid = body["request_id"]  # issued by the Bento, the one sent in front of it
    assert status == 200 and rid.startswith(f"{sent}.")
    status, _, _ = stack.label({"request_id": rid, "label": 1}, {"X-Request-ID": rid})
    assert status == 200
    version = body["model_version"]
    assert logged(stack, [rid]) == {rid: (version, "weighted")}
    engine = make_engine(stack.settings().database_url)
    with engine.connect() as conn:
        assert conn.execute(select(labels.c.label).where(labels.c.request_id == rid)).scalar() == 1
    engine.dispose()
    logs = stack.settings().log_dir
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gateway = [
            json.loads(line)
            for line in (logs / "traefik-access.json").read_text().splitlines()
            if sent in line
        ]
        bento = [
            json.loads(line)
            for line in (logs / f"bento-v{version}.log").read_text().splitlines()
            if rid in line and line.startswith("{")
        ]
        control = [
            json.loads(line)
            for line in (logs / "control-plane.log").read_text().splitlines()
            if rid in line and line.startswith("{")
        ]
        if gateway and bento and control:
            break
        time.sleep(0.5)
    assert {g["RequestPath"] for g in gateway} == {"/predict", "/feedback"}, gateway
    assert any(b.get("request_id") == rid for b in bento), bento
    assert any(c.get("request_id") == rid for c in control), control


def test_a_request_id_sent_twice_through_the_gateway_gets_two_answers_and_two_rows(stack):
    """Every 2xx is exactly one row: a reused X-Request-ID cannot make two answers share one."""
    sent = f"twice-{uuid.uuid4().hex}"
    answers = [
        stack.post(f"{stack.gateway}/predict", {"features": FEATURES}, {"X-Request-ID": sent})
        for _ in range(3)
    ]
    assert [status for status, _, _ in answers] == [200, 200, 200]
    ids = [body["request_id"] for _, _, body in answers]
    assert len(set(ids)) == 3 and all(i.startswith(f"{sent}.") for i in ids)
    assert set(logged(stack, ids)) == set(ids)


def test_labels_through_the_gateway_need_the_label_token_an_issued_id_and_keep_the_first_outcome(stack):
    _, headers, _ = stack.post(f"{stack.gateway}/predict", {"features": FEATURES})
    rid = headers["X-Request-Id"]
    label = {"request_id": rid, "label": 1}
    assert stack.post(f"{stack.gateway}/feedback", label)[0] == 401
    assert (
        stack.post(f"{stack.gateway}/feedback", label, {"Authorization": f"Bearer {stack.token}"})[0] == 401
    )
    forged = f"{rid.rsplit('.', 1)[0]}.{'0' * 24}"
    status, _, answer = stack.label({"request_id": forged, "label": 1})
    assert status == 400 and "not issued by this system" in answer["error"]
    assert stack.label(label)[0] == 200 and stack.label(label)[0] == 200
    status, _, answer = stack.label({"request_id": rid, "label": 0})
    assert status == 409 and rid in answer["error"]
    engine = make_engine(stack.settings().database_url)
    with engine.connect() as conn:
        stored = conn.execute(select(labels.c.label).where(labels.c.request_id.in_([rid, forged]))).all()
    engine.dispose()
    assert stored == [(1,)]


def test_deploying_a_new_version_into_a_role_fails_no_request(stack):
    trained = stack.recsys("train", "--profile", "control", "--rows", "3000", "--iterations", "30")
    version = int(trained.stdout.strip().splitlines()[-1].split()[-1])
    stop = threading.Event()
    outcomes: list[int] = []

    def load():
        while not stop.is_set():
            status, _, _ = stack.post(f"{stack.gateway}/predict", {"features": FEATURES})
            outcomes.append(status)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deploy = stack.recsys("deploy", "--version", str(version), "--role", "control", check=False)
    finally:
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
    assert deploy.returncode == 0, deploy.stderr
    assert len(outcomes) > 100 and set(outcomes) == {200}, {s: outcomes.count(s) for s in set(outcomes)}
    st = json.loads(stack.recsys("status", "--json").stdout)
    control = next(v for v in st["versions"] if v["role"] == "control")
    assert (control["version"], control["weight"], control["healthy"]) == (version, 5, True)
    assert "bento-v1" not in st["processes"], "the replaced version was drained and stopped"


def test_a_user_keeps_one_version_through_the_stack_and_is_logged_as_a_keyed_hash(stack):
    from control_plane.traffic.user_assignment import assigned_role

    # the split in force now (the tests before this one may have moved versions and weights)
    with urllib.request.urlopen(f"{stack.control_plane}/api/traffic", timeout=60) as resp:
        traffic = json.loads(resp.read())
    roles = {v: r for r, v in traffic["versions"].items()}
    split = {r: w for r, w in traffic["weights"].items() if w > 0}
    users = [f"e2e-user-{i}" for i in range(60)]
    served: dict[str, set[int]] = {u: set() for u in users}
    ids: dict[str, str] = {}
    for _ in range(5):
        for user in users:
            status, headers, body = stack.post(
                f"{stack.gateway}/predict", {"features": FEATURES}, {"X-User-Id": user}
            )
            assert status == 200, body
            served[user].add(body["model_version"])
            ids[headers["X-Request-Id"]] = user
    assert all(len(v) == 1 for v in served.values()), served
    assert all(roles[next(iter(served[u]))] == assigned_role(u, split) for u in users)
    logged(stack, list(ids))
    engine = make_engine(stack.settings().database_url)
    try:
        with engine.connect() as conn:
            keys = dict(
                conn.execute(
                    select(predictions.c.request_id, predictions.c.user_key).where(
                        predictions.c.request_id.in_(list(ids))
                    )
                ).all()
            )
    finally:
        engine.dispose()
    by_user: dict[str, set[str]] = {}
    for rid, key in keys.items():
        by_user.setdefault(ids[rid], set()).add(key)
    assert all(len(k) == 1 and len(next(iter(k))) == 32 for k in by_user.values())
    assert len({next(iter(k)) for k in by_user.values()}) == len(users)
    assert not any(user in key for user, k in by_user.items() for key in k)  # never the id itself
    status, _, body = stack.post(f"{stack.gateway}/predict", {"features": FEATURES}, {"X-User-Id": "a b"})
    assert status == 400 and "X-User-Id" in body["error"]
