"""TraefikFileRouter against the real Traefik binary and three tiny backends, all on loopback."""

from __future__ import annotations

import collections
import os
import threading
import time

import httpx
import pytest

from control_plane.traffic import TraefikFileRouter
from control_plane.traffic.traefik_file import GatewayOptions
from tests.conftest import post_large
from tests.integration._traefik import ADMIN, ROLE_VERSIONS, Backends, configure, role_stack, wait_until

pytestmark = pytest.mark.integration

SPLIT = {"baseline": 85, "canary": 10, "control": 5}
LABEL_RATE_PER_S, LABEL_BURST = 20, 40  # small, so that a test can pass it


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Traefik on free ports watching a tmp dir, three role backends plus a control-plane stand-in."""
    traefik = configure(tmp_path_factory.mktemp("traefik"), access_log=True)
    backends = Backends()
    options = GatewayOptions(
        control_plane_url=backends.url("control-plane"),
        label_rate_per_s=LABEL_RATE_PER_S,
        label_burst=LABEL_BURST,
    )

    def gateway_loaded() -> bool:
        return traefik.api_get("/api/http/routers/gateway@file").status_code == 200

    with role_stack(traefik, options, SPLIT, gateway_loaded, 20, backends, extra=("control-plane",)) as stack:
        yield stack


def test_weighted_split_matches_the_weights(stack):
    stack.set_and_wait(SPLIT)
    counts = collections.Counter()
    for i in range(2000):
        response = stack.client.post("/predict" if i % 2 else "/recommend", content=b"{}")
        assert response.status_code == 200
        counts[response.json()["name"]] += 1
    for role, weight in SPLIT.items():
        assert abs(counts[role] / 2000 * 100 - weight) <= 1.5, counts


def test_new_weights_take_traffic_off_the_baseline_within_two_seconds(stack):
    stack.set_and_wait(SPLIT)
    time.sleep(0.6)  # past the providers throttle, as a real weight step would be
    start = time.perf_counter()
    stack.router.set_weights({"baseline": 0, "canary": 100, "control": 0})
    last_baseline_s = 0.0
    while time.perf_counter() - start < 2.0:
        if stack.predict().json()["name"] == "baseline":
            last_baseline_s = time.perf_counter() - start
    names = collections.Counter(stack.predict().json()["name"] for _ in range(200))
    assert names == {"canary": 200}
    assert last_baseline_s < 1.0, f"baseline still served {last_baseline_s:.3f} s after the rewrite"
    print(f"\nbaseline last served {last_baseline_s * 1000:.0f} ms after the rewrite")


def test_ten_rewrites_under_load_fail_no_request(stack):
    stack.set_and_wait(SPLIT)
    stop = threading.Event()
    results: list[collections.Counter] = []

    def load():
        seen = collections.Counter()
        with httpx.Client(base_url=stack.client.base_url, timeout=5) as client:
            while not stop.is_set():
                try:
                    seen[stack.predict(client).status_code] += 1
                except httpx.HTTPError as exc:
                    seen[type(exc).__name__] += 1
        results.append(seen)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = []
    try:
        for i in range(10):
            canary = (i + 1) * 9
            latencies.append(
                stack.set_and_wait({"baseline": 100 - canary - 1, "canary": canary, "control": 1})
            )
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    total = sum(results, collections.Counter())
    assert set(total) == {200}, total
    assert total[200] > 500
    latencies.sort()
    print(
        f"\n{total[200]} requests, 0 failed; new weights in force after {latencies[5] * 1000:.0f} ms median"
    )


def test_header_overrides_reach_the_named_version_and_say_so(stack):
    stack.set_and_wait(SPLIT)
    for _ in range(5):
        by_version = stack.predict(headers={"X-Model-Version": "2"}).json()
        assert by_version == {"name": "canary", "path": "/predict", "route": "override"}
        by_role = stack.client.post("/recommend", headers={"X-Model-Role": "control"}, content=b"{}").json()
        assert by_role == {"name": "control", "path": "/recommend", "route": "override"}
    # A version header beats a role header.
    both = stack.predict(headers={"X-Model-Version": "0", "X-Model-Role": "baseline"}).json()
    assert both["name"] == "control"
    # A client cannot pass its request off as an override: the gateway overwrites the header.
    routes = {stack.predict(headers={"X-Recsys-Route": "override"}).json()["route"] for _ in range(40)}
    assert routes == {"weighted"}
    # Unknown versions fall through to the weighted split.
    assert stack.predict(headers={"X-Model-Version": "99"}).json()["route"] == "weighted"


def test_feedback_goes_through_the_gateway_to_the_control_plane(stack):
    response = stack.client.post("/feedback/labels", content=b'{"request_id": "r1", "label": 1}')
    assert response.json()["name"] == "control-plane"


def test_labels_over_a_client_s_rate_get_429_from_the_gateway(stack):
    time.sleep(LABEL_BURST / LABEL_RATE_PER_S + 0.5)  # a full bucket
    statuses = collections.Counter(
        stack.client.post("/feedback", content=b'{"request_id": "r1", "label": 1}').status_code
        for _ in range(LABEL_BURST * 3)
    )
    assert statuses[429] > 0 and statuses[200] >= LABEL_BURST, statuses
    assert set(statuses) == {200, 429}, statuses


def test_traefik_s_api_asks_for_the_operator_s_credentials(stack):
    for path in ("/api/rawdata", "/api/http/routers", "/dashboard/"):
        assert httpx.get(f"{stack.api}{path}", timeout=2).status_code == 401, path
        assert httpx.get(f"{stack.api}{path}", auth=("operator", "wrong"), timeout=2).status_code == 401
    assert httpx.get(f"{stack.api}/api/rawdata", auth=ADMIN, timeout=2).status_code == 200


def test_a_dead_backend_costs_no_request(stack):
    stack.set_and_wait(SPLIT)
    stack.backends.kill("canary")
    try:
        statuses, names, late_names = collections.Counter(), collections.Counter(), collections.Counter()
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 3.0:
            response = stack.predict()
            statuses[response.status_code] += 1
            if response.status_code == 200:
                (late_names if elapsed > 2.0 else names)[response.json()["name"]] += 1
        assert set(statuses) == {200}, statuses
        assert "canary" not in names and "canary" not in late_names
        # Once the health check has marked it down, its share goes to the live versions.
        assert late_names["baseline"] > 0 and late_names["control"] > 0
    finally:
        stack.backends.start("canary")
    wait_until(lambda: "canary" in {stack.predict().json()["name"] for _ in range(20)}, 5, 0.2)


def test_an_oversized_body_is_refused_by_traefik(stack):
    limit = 1_000_000
    assert stack.predict(content=b"x" * limit).status_code == 200
    url = str(stack.client.base_url.join("/predict"))
    assert post_large(url, b"x" * (limit + 1)) == 413
    assert post_large(url, b"x" * (limit + 1), {"X-Model-Role": "canary"}) == 413


def test_the_api_and_metrics_are_not_on_the_gateway(stack):
    assert stack.client.get("/api/rawdata").status_code == 404
    assert stack.client.get("/dashboard/").status_code == 404
    assert stack.client.get("/metrics").status_code == 404
    metrics = httpx.get(f"{stack.api}/metrics", timeout=2).text
    assert 'service="recsys-v1@file"' in metrics
    assert 'router="gateway@file"' in metrics
    assert httpx.get(f"{stack.api}/ping", timeout=2).text == "OK"


def test_the_access_log_is_json_and_keeps_the_problems_not_the_served(stack):
    import json
    import uuid

    served, refused = f"served-{uuid.uuid4().hex}", f"refused-{uuid.uuid4().hex}"
    assert stack.predict(headers={"X-Request-ID": served}).status_code == 200
    url = str(stack.client.base_url.join("/predict"))
    assert post_large(url, b"x" * 1_000_001, {"X-Request-ID": refused}) == 413
    log = stack.root / "access.log"
    wait_until(lambda: log.exists() and refused in log.read_text(), 5)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [line for line in lines if line.get("request_X-Request-Id") == served], "a 200 is not logged"
    (line,) = [line for line in lines if line.get("request_X-Request-Id") == refused]
    assert line["RouterName"] == "gateway@file"
    assert line["request_X-Recsys-Route"] == "weighted"
    assert line["DownstreamStatus"] == 413 and line["Duration"] > 0
    assert "StartLocal" not in line and "ClientPort" not in line, "only the listed fields are kept"


def test_a_restarted_router_sees_the_weights_in_force(stack):
    stack.set_and_wait(SPLIT)
    again = TraefikFileRouter(stack.router.dynamic_dir)
    assert again.get_weights() == SPLIT == stack.weights_in_force()
    assert {role: b.version for role, b in again.get_backends().items()} == ROLE_VERSIONS
    assert sorted(os.listdir(stack.router.dynamic_dir)) == ["admin.yml", "recsys.yml"]  # no temp files
