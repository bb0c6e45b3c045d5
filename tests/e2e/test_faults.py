"""Faults survived, bad input refused, only operators act: on the real local stack (the shared `stack`).

Every test puts back what it changes (weights, stopped processes, schedules) for the other e2e files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
import zlib

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.deployer.local import bento_port
from control_plane.supervisor import Supervisor
from tests.conftest import wait_for as _wait_for
from tests.steady_traffic import Traffic

pytestmark = pytest.mark.e2e

FEATURES = [0.1 * i for i in range(16)]
RATE_PER_S = 30  # gateway requests per second while a process is killed
KILL_WINDOW_S = 2.0  # Traefik's health check (every 1 s, 1 s timeout) takes a dead Bento out within this


def kill_bound(weight: int) -> int:
    """Failed requests allowed when a Bento dies: its share of the traffic for KILL_WINDOW_S, at least 3."""
    return max(3, int(RATE_PER_S * weight / 100 * KILL_WINDOW_S))


LOOPBACK = {"127.0.0.1", "::1"}


# --- helpers -----------------------------------------------------------------------------------------
wait_for = functools.partial(_wait_for, every_s=0.25)  # fault timings are read off these polls


def steady_load(url: str, rate_per_s: float = RATE_PER_S) -> Traffic:
    """Gateway /predict at a steady rate while something is broken."""
    return Traffic(url, rate_per_s, FEATURES, threads=6, prefix="faults")


def get_json(url: str):
    # 60 s: a control-plane worker's first registry read imports MLflow (over 10 s on a busy machine)
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def traffic_state(stack) -> dict:
    return get_json(f"{stack.control_plane}/api/traffic")


def no_rollout_running(stack) -> None:
    """Weights are compared before and after: a running rollout would move them on its own."""
    active = get_json(f"{stack.control_plane}/api/rollouts?limit=1")["active"]
    assert active is None, f"rollout {active} is running; these tests need the stack at rest"


def program_tree(sup: Supervisor, name: str) -> list[psutil.Process]:
    info = sup.processes()[name]
    root = psutil.Process(info["pid"])
    return [root, *root.children(recursive=True)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def serving_again(stack, sup: Supervisor, name: str, old_pid: int, version: int) -> bool:
    info = sup.processes().get(name, {})
    if info.get("statename") != "RUNNING" or info.get("pid") in (None, 0, old_pid):
        return False
    try:
        r = httpx.post(
            f"{stack.gateway}/predict",
            json={"features": FEATURES},
            headers={"x-model-version": str(version)},
            timeout=5,
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.headers.get("x-model-version") == str(version)


def raw_http(port: int, head: str, body: bytes = b"", timeout_s: float = 5.0) -> tuple[int, float]:
    """Send a request by hand (its Content-Length may lie); the status line and how long it took."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
    return status, time.monotonic() - t0


# --- only operators act; nothing is exposed beyond loopback ----------------------------------------------
def test_every_listening_socket_of_the_stack_is_on_loopback(stack):
    sup = Supervisor(stack.state_dir)
    listening: dict[str, set[tuple[str, int]]] = {}
    for name in sup.processes():
        for p in program_tree(sup, name):
            with contextlib.suppress(psutil.NoSuchProcess):
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.setdefault(name, set()).add((c.laddr.ip, c.laddr.port))
    s = stack.settings()
    ports = {port for socks in listening.values() for _, port in socks}
    assert {
        s.gateway_port,
        s.traefik_api_port,
        s.control_plane_port,
        s.mlflow_port,
        s.embedded_redis_port,
    } <= ports, listening  # the enumeration sees the stack's servers
    exposed = {name: socks for name, socks in listening.items() if any(ip not in LOOPBACK for ip, _ in socks)}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_mlflow_server_runs_without_mlflow_s_job_runner(stack):
    """MLflow 3 starts a job runner and seven huey consumers (1.3 GB here) unless told not to; no job runs."""
    tree = program_tree(Supervisor(stack.state_dir), "mlflow")
    commands = [" ".join(p.cmdline()) for p in tree]
    assert not [c for c in commands if "huey" in c or "jobs._job_runner" in c], commands
    assert len(tree) <= 2, commands  # `mlflow server` and its one uvicorn worker


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/",
        "/api/rawdata",
        "/api/http/routers",
        "/api/overview",
        "/api/traffic",
        "/api/rollouts",
        "/",
        "/login",
        "/metrics",
    ],
)
def test_the_gateway_exposes_neither_traefik_s_dashboard_and_api_nor_the_control_plane(stack, path):
    for method in ("GET", "POST", "PUT"):
        req = urllib.request.Request(
            f"{stack.gateway}{path}", method=method, data=b"{}" if method != "GET" else None
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=5)
        assert refused.value.code == 404, (method, path, refused.value.code)


def test_traefik_s_api_is_on_its_own_loopback_port_behind_the_operator_s_credentials(stack):
    url = f"http://127.0.0.1:{stack.settings().traefik_api_port}/api/http/routers"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, auth=("operator", "wrong"), timeout=10).status_code == 401
    routers = httpx.get(url, auth=("operator", stack.token), timeout=10).json()
    assert {"gateway@file", "feedback@file"} <= {r["name"] for r in routers}


def test_the_mlflow_server_asks_for_credentials(stack):
    url = f"http://127.0.0.1:{stack.settings().mlflow_port}/api/2.0/mlflow/registered-models/search"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, auth=("operator", "wrong"), timeout=30).status_code == 401
    answer = httpx.get(url, auth=("operator", stack.token), timeout=30)
    assert answer.status_code == 200 and answer.json()["registered_models"]


def test_the_embedded_redis_needs_its_password_and_jobs_in_it_are_json(stack):
    from redis import Redis
    from redis.exceptions import AuthenticationError, ResponseError

    s = stack.settings()
    assert s.redis_password and stat_mode(stack.state_dir / "redis-password") == 0o600
    assert stat_mode(stack.state_dir / "redis.conf") == 0o600 and stat_mode(stack.state_dir) == 0o700
    anonymous = Redis(host="127.0.0.1", port=s.embedded_redis_port, socket_timeout=5)
    with pytest.raises((AuthenticationError, ResponseError), match="(?i)auth"):
        anonymous.ping()
    redis = Redis.from_url(s.effective_redis_url)
    ids = [k.decode().removeprefix("rq:job:") for k in redis.scan_iter("rq:job:*") if b":" not in k[7:]]
    assert ids, "no job in Redis"
    for job_id in ids:
        data = redis.hget(f"rq:job:{job_id}", "data")
        if data is not None:
            with contextlib.suppress(zlib.error):
                data = zlib.decompress(data)  # rq compresses what the serializer made
            assert json.loads(data)[0].startswith("control_plane."), job_id  # JSON, not a pickle
    for name, proc in ((n, p) for n, p in Supervisor(stack.state_dir).processes().items()):
        cmdline = " ".join(psutil.Process(proc["pid"]).cmdline()) if proc["pid"] else ""
        assert s.redis_password not in cmdline, f"{name}'s command line shows the Redis password"


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _snapshot(stack) -> tuple:
    return (
        traffic_state(stack),
        get_json(f"{stack.control_plane}/api/rollouts?limit=1000"),
        get_json(f"{stack.control_plane}/api/decisions?limit=1000"),
        get_json(f"{stack.control_plane}/api/versions"),
    )


def test_every_write_without_credentials_is_refused_on_the_running_stack_and_changes_nothing(stack):
    from control_plane.web import create_app
    from tests.unit.test_auth import write_requests

    writes = write_requests(create_app(stack.settings()))
    assert len(writes) >= 11
    before = _snapshot(stack)
    body = json.dumps({"weights": {"baseline": 100}, "version": 3}).encode()
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": stack.token}):
        for method, path in writes:
            resp = httpx.request(
                method,
                f"{stack.control_plane}{path}",
                content=body,
                timeout=10,
                headers={"Content-Type": "application/json", **headers},
            )
            assert resp.status_code in (401, 403), (method, path, resp.status_code, resp.text[:200])
            assert resp.text.strip()
    for method, path in writes:  # and the gateway routes none of them but labels (which need their token)
        expected = 401 if path == "/feedback" else 404
        assert (
            httpx.request(method, f"{stack.gateway}{path}", content=body, timeout=10).status_code == expected
        ), path
    assert _snapshot(stack) == before


def test_secrets_never_appear_in_logs_pages_or_process_listings(stack):
    secret_key = (stack.state_dir / "secret-key").read_text().strip()
    secrets = {
        "operator token": stack.token,
        "session key": secret_key,
        "label token": stack.label_token,
        "request-id key": (stack.state_dir / "request-id-key").read_text().strip(),
    }
    with httpx.Client(base_url=stack.control_plane, timeout=60) as ui:  # an operator logs in, and a guesser
        csrf = ui.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        assert ui.post("/login", data={"csrf_token": csrf, "password": stack.token + "x"}).status_code == 401
        assert ui.post("/login", data={"csrf_token": csrf, "password": stack.token}).status_code == 303
        pages = [
            ui.get(p).text
            for p in (
                "/",
                "/login",
                "/api/versions",
                "/api/rollouts",
                "/api/decisions",
                "/metrics",
                "/readyz",
                "/nope",
            )
        ]
    stack.post(
        f"{stack.control_plane}/api/traffic", {"weights": {}}, {"Authorization": f"Bearer {stack.token}x"}
    )
    time.sleep(1)  # log lines are flushed
    texts = {f"page {i}": p for i, p in enumerate(pages)}
    for f in (stack.state_dir / "logs").rglob("*"):
        if f.is_file():
            texts[str(f)] = f.read_text(errors="replace")
    for f in (stack.state_dir / "supervisor").rglob("*.conf"):
        texts[str(f)] = f.read_text()
    sup = Supervisor(stack.state_dir)
    for name in sup.processes():
        for p in program_tree(sup, name):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                texts[f"{name} pid {p.pid}"] = " ".join(p.cmdline()) + json.dumps(p.environ())
    leaks = [
        (where, what) for where, text in texts.items() for what, secret in secrets.items() if secret in text
    ]
    assert not leaks, leaks


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target", ["gateway /predict", "gateway /feedback", "bento /predict", "control plane /api/traffic"]
)
def test_an_oversized_body_is_refused_before_it_is_read(stack, target):
    """A body announced at 1 GB gets 413 at once: nobody waited for (or buffered) the gigabyte."""
    s = stack.settings()
    versions = traffic_state(stack)["versions"]
    where, path = target.rsplit(" ", 1)
    port = {
        "gateway": s.gateway_port,
        "bento": bento_port(s, versions["baseline"]),
        "control plane": s.control_plane_port,
    }[where]
    auth = f"Authorization: Bearer {stack.token}\r\n" if where == "control plane" else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {10**9}\r\nConnection: close\r\n"
    )
    status, took_s = raw_http(port, head, b'{"features": [' + b"0.5, " * 100)
    assert status == 413 and took_s < 3, (target, status, took_s)


def test_a_chunked_body_is_refused_at_the_gateway_before_it_is_read(stack):
    """Without a Content-Length the gateway answers 411 at once (a malformed chunk-size line was a 500 from
    Traefik, docs/hostile-input.md): it reads at most what Go drains before closing, memory stays bounded."""
    limit = stack.settings().max_body_bytes
    chunk = b"x" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", stack.settings().gateway_port), timeout=10) as s:
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 20 * limit:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        reply = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n" not in reply and (part := s.recv(4096)):
                reply += part
    assert reply.startswith(b"HTTP/1.1 411"), reply[:100]
    assert sent < 20 * limit, f"the gateway read all {sent} bytes instead of refusing the body"


def _check_answer(resp) -> None:
    """No 5xx; a 4xx says why (the Bento's and the control plane's as JSON `error`, Traefik's as text)."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert resp.text.strip(), f"{resp.status_code} without a message"
        ctype = resp.headers.get("content-type") or ""
        if (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json"):
            assert json.loads(resp.text).get("error"), resp.text[:300]


def test_schemathesis_finds_no_5xx_and_no_silent_4xx_in_the_bento_api(stack):
    """The Bento's own OpenAPI (/docs.json): valid and invalid bodies, to a Bento and through the gateway."""
    import requests
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    s = stack.settings()
    versions = traffic_state(stack)["versions"]
    bento = f"http://127.0.0.1:{bento_port(s, versions['control'])}"
    schema = schemathesis.openapi.from_url(f"{bento}/docs.json")
    session = requests.Session()
    counts: dict[tuple[str, str, int], int] = {}

    def fuzz(base: str, n: int, headers: dict, path: str, mode: GenerationMode) -> None:
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema[path]["POST"].as_strategy(mode))
        def run(case):
            resp = case.call(base_url=base, session=session, headers=headers, timeout=10)
            key = (path, mode.value, resp.status_code)
            counts[key] = counts.get(key, 0) + 1
            _check_answer(resp)

        run()

    for base, n, headers in [(bento, 100, {}), (stack.gateway, 60, {"X-Model-Role": "control"})]:
        for path in ("/predict", "/recommend"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(base, n, headers, path, mode)
    assert sum(counts.values()) >= 600
    assert any(k[2] == 200 for k in counts) and any(400 <= k[2] < 500 for k in counts), counts


@settings(
    max_examples=120, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    body=st.binary(max_size=400) | st.text(max_size=200).map(str.encode),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
    # any header value HTTP allows (no control characters); the Bento must refuse or replace a bad id
    request_id=st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=150) | st.none(),
    path=st.sampled_from(["/predict", "/recommend", "/feedback"]),
)
def test_arbitrary_bytes_and_headers_through_the_gateway_get_an_answer_not_a_crash(
    stack, body, content_type, request_id, path
):
    headers = {"X-Model-Role": "control"}
    if content_type:
        headers["Content-Type"] = content_type
    if request_id is not None:
        headers["X-Request-ID"] = request_id.encode("utf-8", "replace")
    try:
        resp = httpx.post(f"{stack.gateway}{path}", content=body, headers=headers, timeout=10)
    except httpx.LocalProtocolError:
        return  # the client itself refused to send it
    _check_answer(resp)


def test_a_canary_whose_bento_cannot_be_built_never_receives_weight(stack, tmp_path):
    from mlflow import MlflowClient

    s = stack.settings()
    client = MlflowClient(tracking_uri=s.mlflow_tracking_uri, registry_uri=s.mlflow_tracking_uri)
    (tmp_path / "not-a-model").mkdir()
    broken = int(client.create_model_version(s.registered_model_name, str(tmp_path / "not-a-model")).version)
    before = traffic_state(stack)
    try:
        status, _, body = stack.post(
            f"{stack.control_plane}/api/rollouts",
            {"version": broken},
            {"Authorization": f"Bearer {stack.token}"},
            timeout=120,
        )
        assert status == 502 and f"version {broken}" in body["error"], (status, body)
        assert traffic_state(stack) == before
        assert f"bento-v{broken}" not in Supervisor(stack.state_dir).processes()
        rollout = get_json(f"{stack.control_plane}/api/rollouts?limit=1")["rollouts"][0]
        assert rollout["candidate_version"] == broken and rollout["phase"] == "rolled_back"
        assert "failed to start" in rollout["reason"] and rollout["canary_weight"] == 0
    finally:
        client.delete_model_version(s.registered_model_name, str(broken))


# --- processes die ------------------------------------------------------------------------------------------
def test_a_redis_outage_does_not_touch_serving_and_evaluations_resume(stack):
    from redis import Redis
    from rq.registry import FinishedJobRegistry

    from control_plane.jobs import EVALUATE_JOB_ID, QUEUE, schedule_evaluations

    s = stack.settings()
    sup = Supervisor(stack.state_dir)
    rpc = sup.rpc().supervisor
    redis = Redis.from_url(s.effective_redis_url)

    def evaluation_scheduled_and_run() -> bool:
        try:
            scheduled = [j.decode() for j in redis.zrange("rq:scheduler:scheduled_jobs", 0, -1)]
            return any(j.startswith(EVALUATE_JOB_ID) for j in scheduled) and any(
                j.startswith(EVALUATE_JOB_ID)
                for j in FinishedJobRegistry(QUEUE, connection=redis).get_job_ids()
            )
        except Exception:
            return False

    try:
        with steady_load(stack.gateway, 20) as traffic:
            time.sleep(2)
            rpc.stopProcess("redis")
            time.sleep(8)
            rpc.startProcess("redis")  # it comes back empty: the embedded Redis keeps nothing on disk
            restarted = time.time()
            time.sleep(2)
        assert not traffic.failed() and len(traffic.answers) > 150, traffic.failed()[:5]
        wait_for(
            evaluation_scheduled_and_run,
            40,
            "the periodic evaluation scheduled again and run after Redis came back empty",
        )
        resumed_s = time.time() - restarted

        def states() -> dict[str, str]:
            procs = sup.processes()
            return {n: procs[n]["statename"] for n in ("worker", "scheduler")}

        # The worker that ran it may still be in supervisord's STARTING (its first 2 s): wait, don't race.
        wait_for(
            lambda: states() == {"worker": "RUNNING", "scheduler": "RUNNING"}, 10, "worker and scheduler up"
        )
        print(
            f"\nredis down 8 s: {len(traffic.answers)} predictions, 0 failed; "
            f"evaluations running again {resumed_s:.1f} s after redis returned"
        )
    finally:
        procs = sup.processes()
        if procs["redis"]["statename"] != "RUNNING":
            rpc.startProcess("redis")
        wait_for(lambda: redis.ping(), 20, "redis answers")
        if not evaluation_scheduled_and_run():
            schedule_evaluations(s.effective_redis_url, s.eval_interval_s)  # leave the stack as we found it


def test_a_bento_that_crashes_under_load_costs_at_most_two_seconds_of_its_traffic_and_comes_back(stack):
    """The baseline (85 %) dies whole (arbiter and worker, as an OOM kill would); Traefik routes around it."""
    sup = Supervisor(stack.state_dir)
    no_rollout_running(stack)
    before = traffic_state(stack)
    version = before["versions"]["baseline"]
    name = f"bento-v{version}"
    tree = program_tree(sup, name)
    with steady_load(stack.gateway) as traffic:
        time.sleep(3)
        killed_at = time.time()
        for p in tree:
            os.kill(p.pid, signal.SIGKILL)
        wait_for(lambda: serving_again(stack, sup, name, tree[0].pid, version), 60, f"{name} restarted")
        back_at = time.time()

        def split_serves_it_again() -> bool:  # Traefik's health check (every 2 s) must take it back
            return any(
                a.version == str(version) and a.status == 200 and a.t > back_at for a in list(traffic.answers)
            )

        wait_for(split_serves_it_again, 30, f"the weighted split sends traffic to {name} again")
        time.sleep(1)
    failed = traffic.failed()
    print(
        f"\nbaseline killed at {RATE_PER_S}/s: {len(failed)} of {len(traffic.answers)} requests failed; "
        f"serving again after {back_at - killed_at:.1f} s"
    )
    assert len(failed) <= kill_bound(before["weights"]["baseline"]), failed
    assert all(killed_at <= a.t <= killed_at + 3 for a in failed), failed
    assert not any(alive(p.pid) for p in tree)
    assert traffic_state(stack) == before, "the weights are the same afterwards"


def test_killing_the_supervised_bentoml_process_leaves_no_orphan_worker(stack):
    """SIGKILL of the process supervisord watches: its worker must not live on, holding the port."""
    sup = Supervisor(stack.state_dir)
    no_rollout_running(stack)
    before = traffic_state(stack)
    version = before["versions"]["canary"]
    name = f"bento-v{version}"
    tree = program_tree(sup, name)
    try:
        with steady_load(stack.gateway) as traffic:
            time.sleep(2)
            os.kill(tree[0].pid, signal.SIGKILL)
            wait_for(
                lambda: (
                    serving_again(stack, sup, name, tree[0].pid, version)
                    and not any(alive(p.pid) for p in tree)
                ),
                45,
                f"{name} restarted by supervisord with no process of the old one left",
            )
        print(
            f"\ncanary's bentoml serve killed at {RATE_PER_S}/s: {len(traffic.failed())} of "
            f"{len(traffic.answers)} requests failed"
        )
        assert len(traffic.failed()) <= kill_bound(before["weights"]["canary"]), traffic.failed()
        assert traffic_state(stack) == before
    finally:
        for p in tree[1:]:  # orphans of the killed server would keep the port and block the restart
            if alive(p.pid):
                os.kill(p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            if sup.processes()[name]["statename"] in ("FATAL", "STOPPED", "EXITED", "BACKOFF"):
                sup.rpc().supervisor.stopProcess(name)
                sup.rpc().supervisor.startProcess(name)
        wait_for(lambda: serving_again(stack, sup, name, tree[0].pid, version), 90, f"{name} serving again")
