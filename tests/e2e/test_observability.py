"""Metrics of the running local stack: every name the dashboard and the rules read is exported, and the
request counters of the Bentos and of Traefik move by exactly the requests sent through the gateway."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.stack.prometheus_config import worker_metrics_port
from tests.unit.test_observability_config import used_metric_names

pytestmark = pytest.mark.e2e

N_REQUESTS = 60
FEATURES = [0.1 * i for i in range(16)]
VERSION_SERVICE = re.compile(r"^recsys-v(\d+)@file$")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def exported_names(text: str) -> set[str]:
    """Every name an exposition declares or samples, with the suffixes its type implies."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
        }
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def sample_sum(text: str, name: str, keep=lambda labels: True) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and keep(s.labels)
    )


def _bentos(stack) -> dict[int, str]:
    """Metrics URL of every Bento holding a role, from `recsys status --json`."""
    status = json.loads(stack.recsys("status", "--json").stdout)
    return {v["version"]: f"{v['url']}/metrics" for v in status["versions"] if v["version"] and v["url"]}


def _urls(stack) -> dict[str, str]:
    s = stack.settings()
    return {
        "traefik": f"http://127.0.0.1:{s.traefik_api_port}/metrics",
        "control-plane": f"{stack.control_plane}/metrics",
        "worker": f"http://127.0.0.1:{worker_metrics_port(s)}/metrics",
    }


def _bento_predictions(text: str) -> float:
    return sample_sum(text, "recsys_requests_total", lambda labels: labels.get("endpoint") == "predict")


def _traefik_by_version(text: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            match = VERSION_SERVICE.match(s.labels.get("service", ""))
            if s.name == "traefik_service_requests_total" and match:
                out[int(match.group(1))] = out.get(int(match.group(1)), 0.0) + s.value
    return out


def _wait_until(check, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result[0] or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_bento_and_traefik_counters_move_by_exactly_the_requests_sent(stack):
    bentos = _bentos(stack)
    assert bentos, "no Bento holds a role"
    traefik_url = _urls(stack)["traefik"]
    before_bento = {v: _bento_predictions(scrape(url)) for v, url in bentos.items()}
    before_traefik = _traefik_by_version(scrape(traefik_url))

    served: dict[int, int] = {}
    for _ in range(N_REQUESTS):
        status, _, body = stack.post(f"{stack.gateway}/predict", {"features": FEATURES})
        assert status == 200, body
        served[body["model_version"]] = served.get(body["model_version"], 0) + 1
    assert set(served) <= set(bentos), f"served by {sorted(served)}, roles held by {sorted(bentos)}"
    expected = {v: served.get(v, 0) for v in bentos}

    def moved():
        bento = {v: _bento_predictions(scrape(url)) - before_bento[v] for v, url in bentos.items()}
        after = _traefik_by_version(scrape(traefik_url))
        traefik = {v: after.get(v, 0.0) - before_traefik.get(v, 0.0) for v in bentos}
        return bento == expected and traefik == expected, bento, traefik

    ok, bento, traefik = _wait_until(moved, 10)
    assert sum(expected.values()) == N_REQUESTS
    assert (bento, traefik) == (expected, expected), (
        f"requests served per version {expected}; Bento counters moved by {bento}, Traefik's by {traefik}"
    )


def test_every_metric_the_dashboard_and_rules_read_is_exported(stack):
    urls = {**_urls(stack), **{f"bento v{v}": url for v, url in _bentos(stack).items()}}
    for _ in range(
        5
    ):  # some series appear only after a request (the prediction log's, Traefik's per service)
        stack.post(f"{stack.gateway}/predict", {"features": FEATURES})
    used = used_metric_names()

    def missing():
        exported: dict[str, set[str]] = {}
        for part, url in urls.items():
            try:
                exported[part] = exported_names(scrape(url))
            except OSError as exc:
                exported[part] = set()
                print(f"{part} at {url} did not answer: {exc}")
        gone = used - set().union(*exported.values())
        return not gone, gone, {part: len(names) for part, names in exported.items()}

    # The worker's job metrics appear after its first job, the prediction log's after its first batch.
    ok, gone, sizes = _wait_until(missing, 30)
    assert not gone, (
        f"read by the dashboard or the rules but exported by no part: {sorted(gone)} (names per part: {sizes})"
    )


def test_the_stacks_prometheus_scrapes_every_part_and_loads_the_rules(stack):
    """`recsys up` runs Prometheus when its binary is installed: every target answers, the rules are loaded."""
    if shutil.which("prometheus") is None:
        pytest.skip(
            "the prometheus binary is not installed (Debian's `prometheus` package; `make system-deps`)"
        )
    s = stack.settings()
    api = f"http://127.0.0.1:{s.prometheus_port}/api/v1"
    n_bentos = len(_bentos(stack))

    def targets():
        try:
            active = json.loads(scrape(f"{api}/targets?state=active"))["data"]["activeTargets"]
        except OSError as exc:
            return False, f"Prometheus does not answer: {exc}"
        health = sorted((t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]) for t in active)
        jobs = {job for job, *_ in health}
        bentos = [h for h in health if h[0] == "bentos"]
        ok = (
            jobs == {"traefik", "bentos", "control-plane", "worker", "prometheus"}
            and len(bentos) == n_bentos
            and all(h[2] == "up" for h in health)
        )
        return ok, health

    ok, health = _wait_until(targets, 45)
    assert ok, f"Prometheus targets (job, url, health, error), {n_bentos} Bentos expected: {health}"
    groups = json.loads(scrape(f"{api}/rules"))["data"]["groups"]
    alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert {"CanaryErrorRateAboveBaseline", "CanaryP99OverGuardrail", "SampleRatioMismatch"} <= alerts
