"""`bentoml serve recsys:v2` built from the registry: pinned version, HTTP contract, prediction log in Postgres.

One module-scoped server (two tiny registered versions, both built; v1 built last so that `latest`
would be the wrong one) whose database connection runs through a TCP proxy the tests can cut.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy import delete, insert, select, update

from control_plane.db.engine import make_engine
from control_plane.db.schema import predictions, traffic_config
from tests.conftest import free_port
from tests.integration._tcp_proxy import TcpProxy
from tests.integration.test_predlog_postgres import via_port

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
PREFIX = f"t{uuid.uuid4().hex[:8]}"
FEATURES = [0.6, 1.2, 0.3, 1.6, 0.25, 28.0, 40.0, 4.2, 0.1, 0.4, 1.0, 0.5, -0.8, 0.0, 2.0, 1.0]
SERVED: list[str] = []  # request ids answered 2xx: each must be exactly one row


def wait_until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout_s}s")
        time.sleep(0.1)


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, proxy: TcpProxy, log_path: Path, engine) -> None:
        self.url, self.proc, self.proxy, self.log_path, self.engine = url, proc, proxy, log_path, engine
        self.client = httpx.Client(base_url=url, timeout=30)

    def post(
        self, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None
    ) -> httpx.Response:
        rid = f"{PREFIX}-{uuid.uuid4().hex[:12]}"
        hdrs = {"content-type": "application/json", "x-request-id": rid, **(headers or {})}
        content = raw if raw is not None else json.dumps(body).encode()
        r = self.client.post(path, content=content, headers=hdrs)
        if 200 <= r.status_code < 300:
            SERVED.append(r.headers["x-request-id"])
        return r

    def logged_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return [
                r[0]
                for r in conn.execute(
                    select(predictions.c.request_id).where(predictions.c.request_id.like(f"{PREFIX}-%"))
                )
            ]

    def metrics(self) -> str:
        return self.client.get("/metrics").text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bento")


@pytest.fixture(scope="module")
def registry(workdir) -> str:
    """Two registered versions trained differently, so their scores tell them apart."""
    from training.train import train_and_register

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    kwargs = dict(
        tracking_uri=uri,
        artifact_location=str(workdir / "mlartifacts"),
        n_rows=400,
        iterations=20,
        progress=False,
    )
    assert train_and_register(profile="worse", **kwargs) == 1
    assert train_and_register(profile="baseline", **kwargs) == 2
    return uri


@pytest.fixture(scope="module")
def bento_env(workdir, registry) -> dict[str, str]:
    env = {
        **os.environ,
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "MLFLOW_TRACKING_URI": registry,
        "RECSYS_STATE_DIR": str(workdir / "state"),
    }
    python = str(VENV_BIN / "python")
    # v2 through the CLI entry point; then v1 and (again, idempotently) v2 in one process.
    out = subprocess.run(
        [python, "-m", "bentos.build", "--version", "2"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["recsys:v2"]
    code = "import os\nfrom bentos.build import build_bento\nfor v in (1, 2): print(build_bento(v, tracking_uri=os.environ['MLFLOW_TRACKING_URI']))"
    out = subprocess.run(
        [python, "-c", code], env=env, cwd=workdir, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["recsys:v1", "recsys:v2"]
    return env


@pytest.fixture(scope="module")
def server(bento_env, pg_url, workdir):
    pg = urlsplit(pg_url)
    proxy = TcpProxy(free_port(), (pg.hostname, pg.port or 5432)).start()
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(delete(traffic_config))
        conn.execute(
            insert(traffic_config),
            [{"role": "canary", "version": 2, "weight": 10, "updated_at": time.time()}],
        )
    port = free_port()
    env = {
        **bento_env,
        "DATABASE_URL": via_port(pg_url, proxy.port),
        "RECSYS_SPILL_DIR": str(workdir / "spill"),
        "RECSYS_ACCESS_LOG": "on",
    }
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "bentoml"), "serve", "recsys:v2", "--port", str(port), "--host", "127.0.0.1"],
            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    srv = Server(f"http://127.0.0.1:{port}", proc, proxy, log_path, engine)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"bentoml serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            return srv.client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 90, "readyz")
        wait_until(
            lambda: (
                srv.client.post("/predict", json={"features": FEATURES}).headers.get("x-model-role")
                == "canary"
            ),
            10,
            "role",
        )
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        srv.client.close()
        proxy.stop()
        with engine.begin() as conn:
            conn.execute(delete(traffic_config))
        engine.dispose()


def local_score(tracking_uri: str, version: int) -> float:
    import mlflow
    import mlflow.catboost
    import numpy as np

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = client.get_model_version("recsys", str(version))
    model = mlflow.catboost.load_model(client.get_model_version_download_uri("recsys", mv.version))
    return float(model.predict_proba(np.asarray(FEATURES))[1])


def test_each_bento_pins_its_own_version_and_latest_is_not_the_one_served(bento_env):
    home = Path(bento_env["BENTOML_HOME"]) / "bentos" / "recsys"
    assert (home / "latest").read_text().strip() == "v1"
    for v in (1, 2):
        info = yaml.safe_load((home / f"v{v}" / "bento.yaml").read_text())
        assert info["args"] == {"model_version": v, "model_name": "recsys"}
        assert [m["tag"] for s in info["services"] for m in s["models"]] == [f"recsys-model:v{v}"]


def test_health_endpoints(server):
    assert server.client.get("/healthz").status_code == 200
    assert server.client.get("/readyz").status_code == 200
    log_state = server.client.get("/predlog").json()
    assert log_state["model_version"] == 2 and log_state["spill_rows"] == 0 and log_state["db_up"] is True


def test_predict_serves_version_2_with_its_role_and_headers(server, registry):
    r = server.post("/predict", {"features": FEATURES})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"request_id", "score", "model_version", "role"}
    assert body["model_version"] == 2 and body["role"] == "canary"
    assert body["request_id"] == r.headers["x-request-id"]
    assert r.headers["x-model-version"] == "2" and r.headers["x-model-role"] == "canary"
    v2, v1 = local_score(registry, 2), local_score(registry, 1)
    assert body["score"] == pytest.approx(v2, abs=1e-12)
    assert abs(v1 - v2) > 1e-6  # the check above could tell the versions apart


def test_a_caller_s_request_id_comes_back_in_front_of_a_fresh_signed_one(server, bento_env):
    from control_plane.credentials import ensure_request_id_key
    from control_plane.request_ids import RequestIdSigner
    from control_plane.settings import Settings

    r = server.post("/predict", {"features": FEATURES}, headers={"x-request-id": f"{PREFIX}-mine-1"})
    issued = r.json()["request_id"]
    assert issued == r.headers["x-request-id"] and issued.startswith(f"{PREFIX}-mine-1.")
    signer = RequestIdSigner.from_secret(ensure_request_id_key(Settings.from_env(bento_env)))
    assert signer.issued(issued)  # the key the control plane checks labels with
    assert not signer.issued(f"{PREFIX}-mine-1") and not signer.issued(
        issued[:-1] + ("1" if issued.endswith("0") else "0")
    )


def test_a_request_id_sent_twice_gets_two_answers_each_with_its_own_row(server):
    """A client cannot make two answers share an id (and so hide one of them from the log)."""
    sent = f"{PREFIX}-twice"
    first, second = (
        server.post("/predict", {"features": FEATURES}, headers={"x-request-id": sent}) for _ in range(2)
    )
    assert first.status_code == second.status_code == 200
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(i.startswith(f"{sent}.") for i in ids)
    wait_until(lambda: ids <= set(server.logged_ids()), 15, "both rows in postgres")


def test_recommend_ranks_with_one_score_per_candidate(server):
    cands = [
        {"item_id": f"i{i}", "features": [*FEATURES[:9], -0.9 + 0.4 * i, *FEATURES[10:]]} for i in range(5)
    ]
    r = server.post("/recommend", {"candidates": cands, "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"request_id", "items", "model_version", "role"} and body["model_version"] == 2
    scores = [it["score"] for it in body["items"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    singles = {
        c["item_id"]: server.post("/predict", {"features": c["features"]}).json()["score"] for c in cands
    }
    assert [it["item_id"] for it in body["items"]] == sorted(singles, key=singles.get, reverse=True)[:3]
    for it in body["items"]:
        assert it["score"] == pytest.approx(singles[it["item_id"]], abs=1e-12)
    assert len(server.post("/recommend", {"candidates": cands[:2], "k": 10}).json()["items"]) == 2
    # the served list, in served order, is logged with the row: clicks are checked against it
    served = {}

    def logged() -> bool:
        with server.engine.connect() as conn:
            q = select(predictions.c.served).where(predictions.c.request_id == body["request_id"])
            served["items"] = conn.execute(q).scalar()
        return served["items"] is not None

    wait_until(logged, 15, "the /recommend row in postgres")
    assert served["items"] == [it["item_id"] for it in body["items"]]


NAN_ROW = b'{"features": [NaN' + b", 1" * 15 + b"]}"
INF_ROW = b'{"features": [1' + b", 1" * 14 + b", Infinity]}"
GOOD_CANDIDATE = {"item_id": "a", "features": FEATURES}


@pytest.mark.parametrize(
    ("path", "body", "raw", "headers", "status", "words"),
    [
        ("/predict", {"features": FEATURES[:15]}, None, None, 400, "at least 16"),
        ("/predict", {"features": [*FEATURES, 1.0]}, None, None, 400, "at most 16"),
        ("/predict", {"features": ["0.5", *FEATURES[1:]]}, None, None, 400, "valid number"),
        ("/predict", {"features": [None, *FEATURES[1:]]}, None, None, 400, "valid number"),
        ("/predict", None, NAN_ROW, None, 400, "finite number"),
        ("/predict", None, INF_ROW, None, 400, "finite number"),
        ("/predict", {}, None, None, 400, "Field required"),
        ("/predict", None, b"null", None, 400, "object"),
        ("/predict", None, b'{"features": [1,', None, 400, "Invalid JSON"),
        ("/predict", {"features": FEATURES}, None, {"content-type": "text/plain"}, 415, "application/json"),
        ("/predict", {"features": FEATURES}, None, {"x-request-id": "a b"}, 400, "X-Request-ID"),
        ("/recommend", {"candidates": [], "k": 1}, None, None, 400, "at least 1"),
        (
            "/recommend",
            {"candidates": [GOOD_CANDIDATE], "k": 0},
            None,
            None,
            400,
            "greater than or equal to 1",
        ),
        (
            "/recommend",
            {"candidates": [GOOD_CANDIDATE], "k": 1001},
            None,
            None,
            400,
            "less than or equal to 1000",
        ),
        (
            "/recommend",
            {"candidates": [GOOD_CANDIDATE] * 2, "k": 1},
            None,
            None,
            400,
            "duplicate item_id 'a'",
        ),
        ("/recommend", {"candidates": [GOOD_CANDIDATE] * 1001, "k": 1}, None, None, 400, "at most 1000"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem(server, path, body, raw, headers, status, words):
    r = server.post(path, body, raw=raw, headers=headers)
    assert r.status_code == status, r.text
    assert "error" in r.json() and words in r.text


def test_a_body_over_the_limit_is_refused_413(server):
    r = server.post("/predict", raw=b" " * 1_000_001)
    assert r.status_code == 413 and "RECSYS_MAX_BODY_BYTES" in r.json()["error"]


BODY_TIMEOUT_S = 5  # bentos.service's (that module needs the Bento's build arguments to import)


def test_a_body_that_never_arrives_is_a_408_after_the_body_timeout(server):
    """The gate, ahead of BentoML's timeout middleware, bounds the wait for a body itself."""
    url = urlsplit(server.url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=BODY_TIMEOUT_S + 10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: bento\r\nContent-Type: application/json\r\n"
            b'Content-Length: 40\r\n\r\n{"features": '  # and nothing more
        )
        reply = b""
        while b"}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert b"did not arrive within 5 s" in reply
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 3  # swept once a second


def test_wrong_method_is_a_405(server):
    assert server.client.get("/predict").status_code == 405


def test_every_2xx_is_exactly_one_row_in_postgres(server):
    wait_until(lambda: len(server.logged_ids()) == len(SERVED), 15, "rows in postgres")
    assert sorted(server.logged_ids()) == sorted(SERVED)
    with server.engine.connect() as conn:
        row = (
            conn.execute(select(predictions).where(predictions.c.request_id.like(f"{PREFIX}-mine-1.%")))
            .mappings()
            .one()
        )
    assert row["model_version"] == 2 and row["role"] == "canary" and row["route"] == "direct"
    assert row["endpoint"] == "predict" and row["status"] == 200 and row["features"] == FEATURES
    assert row["latency_ms"] > 0 and abs(row["ts"] - time.time()) < 120


def test_traefik_s_route_header_is_logged(server):
    rid = server.post("/predict", {"features": FEATURES}, headers={"x-recsys-route": "weighted"}).headers[
        "x-request-id"
    ]
    wait_until(lambda: rid in server.logged_ids(), 10, "row")
    with server.engine.connect() as conn:
        assert (
            conn.execute(select(predictions.c.route).where(predictions.c.request_id == rid)).scalar_one()
            == "weighted"
        )


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels` (0 if there is none)."""
    for m in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.items() <= found.items():
            return float(m.group(2))
    return 0.0


def test_model_endpoints_are_counted_by_ours_and_other_paths_by_bentoml_s(server):
    """The gate answers /predict before BentoML's middlewares (bentoml_fixes.gate_first)."""
    before = server.metrics()
    assert server.post("/predict", {"features": FEATURES}).status_code == 200
    assert server.client.get("/readyz").status_code == 200
    after = server.metrics()
    ours = dict(endpoint="predict", role="canary", status="200")
    assert (
        sample(after, "recsys_requests_total", **ours) == sample(before, "recsys_requests_total", **ours) + 1
    )
    theirs = dict(endpoint="/predict", http_response_code="200")
    assert sample(after, "bentoml_service_request_total", **theirs) == sample(
        before, "bentoml_service_request_total", **theirs
    )
    ready = dict(endpoint="/readyz", http_response_code="200")
    assert sample(after, "bentoml_service_request_total", **ready) > sample(
        before, "bentoml_service_request_total", **ready
    )


def test_metrics_have_bentoml_s_and_ours_in_a_directory_of_this_bento_s_own(server, bento_env):
    own = Path(bento_env["BENTOML_HOME"]) / "prometheus_multiproc_dir.recsys-v2"
    assert any(own.glob("*.db"))  # not the shared prometheus_multiproc_dir every Bento would empty
    text = server.metrics()
    assert 'bentoml_service_request_total{endpoint="/readyz",http_response_code="200"' in text
    assert 'recsys_requests_total{endpoint="predict",model_version="2",role="canary",status="200"}' in text
    assert 'recsys_requests_total{endpoint="predict",model_version="2",role="canary",status="400"}' in text
    for name in (
        "recsys_request_duration_seconds_bucket",
        "recsys_model_load_seconds",
        "recsys_predlog_queue_depth",
        "recsys_predlog_spill_bytes",
        "recsys_predlog_spill_rows",
        "recsys_predlog_rows_written_total",
    ):
        assert name in text, name

    def rows_written() -> float:
        m = re.search(
            r'^recsys_predlog_rows_written_total\{model_version="2"\} (\S+)$', server.metrics(), re.M
        )
        return float(m.group(1)) if m else 0.0

    # exported from the start (at 0), counted once the writer reports its batches (at most 1 s apart)
    wait_until(lambda: rows_written() > 0, 15, "a positive recsys_predlog_rows_written_total")


def test_log_lines_are_json_with_the_request_id(server):
    rid = server.post("/predict", {"features": FEATURES}).headers["x-request-id"]

    def line_for_rid():
        for line in server.log_path.read_text().splitlines():
            if line.startswith("{") and rid in line:
                return json.loads(line)
        return None

    wait_until(lambda: line_for_rid() is not None, 5, "log line")
    line = line_for_rid()
    assert line["request_id"] == rid and line["status"] == 200 and line["model_version"] == 2


def test_a_database_outage_loses_and_duplicates_nothing(server):
    server.proxy.stop()
    during = [server.post("/predict", {"features": FEATURES}) for _ in range(40)]
    assert all(r.status_code == 200 and r.json()["role"] == "canary" for r in during)  # last known role kept
    ids = [r.headers["x-request-id"] for r in during]
    wait_until(lambda: 'recsys_predlog_db_up{model_version="2"} 0.0' in server.metrics(), 10, "db down seen")
    assert set(ids).isdisjoint(server.logged_ids())
    wait_until(
        lambda: server.client.get("/predlog").json()["spill_rows"] >= len(ids), 10, "the backlog shown"
    )
    assert server.client.get("/predlog").json()["db_up"] is False
    server.proxy.start()
    wait_until(lambda: set(ids) <= set(server.logged_ids()), 30, "replayed rows")
    wait_until(lambda: len(server.logged_ids()) == len(SERVED), 10, "all rows")
    wait_until(lambda: server.client.get("/predlog").json()["spill_rows"] == 0, 10, "no backlog left")
    assert sorted(server.logged_ids()) == sorted(SERVED)
    assert "recsys_predlog_rows_replayed_total" in server.metrics()


def test_the_role_follows_traffic_config_without_a_restart(server):
    with server.engine.begin() as conn:
        conn.execute(update(traffic_config).where(traffic_config.c.role == "canary").values(version=3))
        conn.execute(
            insert(traffic_config),
            [{"role": "baseline", "version": 2, "weight": 90, "updated_at": time.time()}],
        )
    wait_until(
        lambda: server.post("/predict", {"features": FEATURES}).json()["role"] == "baseline",
        10,
        "role change",
    )
    assert server.post("/predict", {"features": FEATURES}).headers["x-model-role"] == "baseline"


def test_shutdown_drains_the_prediction_log(server):
    burst = [server.post("/predict", {"features": FEATURES}) for _ in range(100)]
    assert all(r.status_code == 200 for r in burst)
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert sorted(server.logged_ids()) == sorted(SERVED)


# Hides this checkout from every Python process that loads it (`bentoml serve`, its worker, the log's
# writer process): the editable install's finder and any path entry into the checkout. What the Bento
# serves then comes from its own copy of the sources, as on a machine that has only the Bento.
HIDE_THE_CHECKOUT = """
import os
import sys

CHECKOUT = {checkout!r}
ENVIRONMENT = os.path.realpath(sys.prefix)  # the virtualenv may sit inside the checkout (make's .venv)


def _in_checkout(path):
    real = os.path.realpath(path or os.getcwd())
    inside = lambda root: real == root or real.startswith(root + os.sep)
    return inside(CHECKOUT) and not inside(ENVIRONMENT)


sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not _in_checkout(p)]
"""


def test_a_bento_holds_every_file_it_imports_and_serves_from_a_clean_directory(bento_env, pg_url, tmp_path):
    from bentos.build import PROJECT_DIR, bento_sources

    src = Path(bento_env["BENTOML_HOME"]) / "bentos" / "recsys" / "v1" / "src"
    copied = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    assert copied == bento_sources() and "control_plane/request_ids.py" in copied  # derived, not listed

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_THE_CHECKOUT.format(checkout=str(PROJECT_DIR)))
    clean = tmp_path / "clean"
    clean.mkdir()
    env = {
        **{k: v for k, v in bento_env.items() if k != "PYTHONPATH"},
        "PYTHONPATH": str(site),
        "DATABASE_URL": pg_url,
        "RECSYS_SPILL_DIR": str(tmp_path / "spill"),
    }
    hidden = subprocess.run(
        [sys.executable, "-c", "import control_plane"], env=env, cwd=clean, capture_output=True
    )
    assert hidden.returncode != 0, "the checkout is still importable: the test would prove nothing"

    port = free_port()
    log_path = tmp_path / "serve-clean.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "bentoml"), "serve", "recsys:v1", "--port", str(port), "--host", "127.0.0.1"],
            env=env, cwd=clean, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"bentoml serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    engine = make_engine(pg_url)
    try:
        wait_until(ready, 90, "readyz")
        r = client.post("/predict", json={"features": FEATURES}, headers={"x-request-id": f"{PREFIX}-clean"})
        assert r.status_code == 200 and r.headers["x-model-version"] == "1", r.text
        rid = r.headers["x-request-id"]

        def logged() -> bool:  # through the log's writer process, also run from the Bento's copy
            with engine.connect() as conn:
                return conn.execute(
                    select(predictions.c.request_id).where(predictions.c.request_id == rid)
                ).first()

        wait_until(logged, 20, "the row in postgres")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        client.close()
        engine.dispose()


def test_a_bento_is_built_into_the_home_it_is_given_without_bentoml_home_set(registry, tmp_path):
    # As `recsys up` builds: BENTOML_HOME unset (BentoML's default would be ~/bentoml), the stack's home
    # given to build_bento, which points this process's BentoML there without changing its environment.
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    env["HOME"] = str(tmp_path)
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from bentos.build import build_bento\n"
        f"print(build_bento(1, tracking_uri={registry!r}, bentoml_home=Path({str(tmp_path / 'stack')!r})))\n"
        "assert 'BENTOML_HOME' not in os.environ\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "recsys:v1"
    assert (tmp_path / "stack" / "bentos" / "recsys" / "v1" / "bento.yaml").is_file()
    assert (tmp_path / "stack" / "models" / "recsys-model").is_dir()
    assert not (tmp_path / "bentoml").exists()
