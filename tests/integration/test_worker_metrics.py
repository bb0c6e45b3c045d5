"""The RQ worker's job metrics: a real `rq worker --worker-class ...MetricsWorker` on the real Redis, scraped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.settings import Settings
from control_plane.worker_metrics import MetricsConfig
from tests.conftest import free_port

pytestmark = pytest.mark.integration

RQ = str(Path(sys.executable).with_name("rq"))
QUEUE = "recsys-metrics-test"
REPO = Path(__file__).resolve().parents[2]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _wait_for(what: str, check, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


@pytest.fixture
def worker(redis_url, tmp_path):
    """A real worker process with the metrics worker class, as the local stack runs it."""
    port = free_port()
    multiproc = tmp_path / "multiproc"
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "RECSYS_WORKER_METRICS_PORT": str(port),
        "RECSYS_WORKER_METRICS_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [RQ, "worker", "--url", redis_url, "--worker-class", "control_plane.worker_metrics.MetricsWorker",
         "--name", f"metrics-test-{os.getpid()}", QUEUE],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield port, multiproc, proc
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        print(out)


def test_the_worker_serves_durations_and_outcomes_of_the_jobs_its_horses_ran(redis_url, worker):
    from redis import Redis
    from rq import Queue

    port, multiproc, proc = worker
    conn = Redis.from_url(redis_url)
    queue = Queue(QUEUE, connection=conn)
    ok = queue.enqueue(len, [1, 2, 3])
    bad = queue.enqueue(divmod, 1, 0)  # ZeroDivisionError
    dies = queue.enqueue(os.abort)  # the horse dies of SIGABRT and records nothing itself

    def done():
        assert proc.poll() is None, proc.stdout.read()
        return all(j.get_status() in ("finished", "failed") for j in (ok, bad, dies))

    _wait_for("the three jobs", done)
    assert (ok.get_status(), bad.get_status(), dies.get_status()) == ("finished", "failed", "failed")

    def scraped():
        try:
            samples = _samples(_scrape(port))
        except (urllib.error.URLError, OSError):
            return None
        total = sum(v for (name, _), v in samples.items() if name == "recsys_jobs_total")
        return samples if total >= 3 else None

    samples = _wait_for("three jobs in the worker's metrics", scraped, 30)
    jobs = {dict(labels)["func"] + "/" + dict(labels)["status"]: v
            for (name, labels), v in samples.items() if name == "recsys_jobs_total"}  # fmt: skip
    assert jobs == {"builtins.len/finished": 1, "builtins.divmod/failed": 1, "posix.abort/killed": 1}
    failures = {
        dict(labels)["func"]: v
        for (name, labels), v in samples.items()
        if name == "recsys_job_failures_total"
    }
    assert failures == {"builtins.divmod": 1, "posix.abort": 1}
    counts = {dict(labels)["func"]: v for (name, labels), v in samples.items()
              if name == "recsys_job_duration_seconds_count"}  # fmt: skip
    assert counts == {"builtins.len": 1, "builtins.divmod": 1, "posix.abort": 1}
    inf_bucket = {
        dict(labels)["func"]: v
        for (name, labels), v in samples.items()
        if name == "recsys_job_duration_seconds_bucket" and dict(labels)["le"] == "+Inf"
    }
    assert inf_bucket == counts
    sums = [v for (name, _), v in samples.items() if name == "recsys_job_duration_seconds_sum"]
    assert all(0 <= s < 30 for s in sums)

    # The horses share one set of files: a job adds no file.
    files_before = sorted(p.name for p in multiproc.iterdir())
    more = queue.enqueue(len, [])
    _wait_for("a fourth job", lambda: more.get_status() == "finished")
    _wait_for("the fourth job in the metrics", lambda: _samples(_scrape(port)).get(
        ("recsys_jobs_total", (("func", "builtins.len"), ("status", "finished")))) == 2)  # fmt: skip
    assert sorted(p.name for p in multiproc.iterdir()) == files_before
    assert len(files_before) <= 4, files_before
    conn.close()


def test_the_metrics_settings_come_from_the_environment(tmp_path):
    assert MetricsConfig.from_settings(Settings.from_env({})) == MetricsConfig("127.0.0.1", 9101, None)
    cfg = MetricsConfig.from_settings(Settings.from_env(
        {"RECSYS_WORKER_METRICS_PORT": "9200", "RECSYS_WORKER_METRICS_HOST": "0.0.0.0",
         "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    ))  # fmt: skip
    assert cfg == MetricsConfig("0.0.0.0", 9200, tmp_path)
