"""The production shape, for real: docker-compose.yml's containers (local build path), in this order.

Traffic goes only to the ports the stack publishes on 127.0.0.1. The last test takes the stack down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.compose.conftest import DOCKER
from tests.conftest import wait_for

# The first test also builds the images (cold: about 15 minutes here) and starts the stack.
pytestmark = pytest.mark.timeout(3600)

SPLIT = {"baseline": 85, "canary": 10, "control": 5}


def _roles(stack) -> dict[str, int]:
    """role -> version, as traffic_config holds them."""
    rows = stack.sql("SELECT role, version FROM traffic_config WHERE version IS NOT NULL")
    return {role: int(version) for role, version in (r.split("\t") for r in rows)}


def _weights(stack) -> dict[str, str]:
    return dict(
        r.split("\t", 1) for r in stack.sql("SELECT role, version || ':' || weight FROM traffic_config")
    )


def _logged(stack, prefix: str) -> int:
    return int(stack.sql(f"SELECT count(*) FROM predictions WHERE request_id LIKE '{prefix}%'")[0])


def _paced_load(stack, rate_per_s: float, duration_s: float, prefix: str) -> list[tuple[float, int, str]]:
    """Requests sent on a fixed schedule (not waiting for answers): (sent at, status, role) each."""
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def one(i: int, at: float) -> None:
        status, headers = stack.predict({"X-Request-Id": f"{prefix}{i}"}, timeout=10)
        with lock:
            results.append((at, status, headers.get("x-model-role", "")))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        for i in range(int(rate_per_s * duration_s)):
            at = t0 + i / rate_per_s
            time.sleep(max(0.0, at - time.monotonic()))
            pool.submit(one, i, at - t0)
    return sorted(results)


def test_the_seeds_curl_is_answered_through_the_containerized_gateway(compose_stack):
    status, headers = compose_stack.predict()
    assert status == 200
    assert int(headers["x-model-version"]) in _roles(compose_stack).values()
    assert compose_stack.bento_containers() == sorted(
        f"{compose_stack.project}-bento-v{v}" for v in set(_roles(compose_stack).values())
    )


def test_2000_requests_split_85_10_5_and_each_is_logged_in_postgres(compose_stack):
    prefix = f"split-{uuid.uuid4().hex[:8]}-"
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(lambda i: compose_stack.predict({"X-Request-Id": f"{prefix}{i}"}), range(2000))
        )
    assert Counter(status for status, _ in answers) == {200: 2000}
    counts = Counter(headers["x-model-role"] for _, headers in answers)
    shares = {role: 100 * counts[role] / 2000 for role in SPLIT}
    assert all(abs(shares[role] - SPLIT[role]) <= 1.5 for role in SPLIT), shares
    wait_for(lambda: _logged(compose_stack, prefix) == 2000, 60, "2,000 rows in the containerized Postgres")
    rows = compose_stack.sql(
        f"SELECT role, count(*) FROM predictions WHERE request_id LIKE '{prefix}%' GROUP BY 1"
    )
    assert {r.split("\t")[0]: int(r.split("\t")[1]) for r in rows} == dict(counts)


def test_the_gate_refuses_what_the_deployer_does_not_need(compose_stack):
    """The control plane has no Docker socket; through the gate it cannot mount the host's files."""
    probe = (
        "import json, urllib.request, urllib.error\n"
        "spec = {'Image': 'recsys-bento:v1', 'HostConfig': {'Binds': ['/:/host']}}\n"
        f"req = urllib.request.Request('http://docker-gate:2375/v1.41/containers/create?name={compose_stack.project}-bento-v1',"
        " data=json.dumps(spec).encode(), headers={'Content-Type': 'application/json'})\n"
        "try:\n    urllib.request.urlopen(req, timeout=5); print('ALLOWED')\n"
        "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n"
    )
    out = compose_stack.compose("exec", "-T", "control-plane", "python", "-c", probe).stdout
    assert out.startswith("403") and "Binds" in out, out
    socket_check = compose_stack.compose(
        "exec", "-T", "control-plane", "test", "-e", "/var/run/docker.sock", check=False
    )
    assert socket_check.returncode != 0


def test_containers_run_unprivileged_on_read_only_roots(compose_stack):
    names = compose_stack.docker(
        "ps",
        "--filter",
        f"label=com.docker.compose.project={compose_stack.project}",
        "--format",
        "{{.Names}}",
    ).split()
    inspected = json.loads(compose_stack.docker("inspect", *names))
    root_users = [c["Name"] for c in inspected if c["Config"]["User"] in ("", "0", "root", "0:0")]
    writable = [c["Name"] for c in inspected if not c["HostConfig"]["ReadonlyRootfs"]]
    published = [
        (c["Name"], b["HostIp"])
        for c in inspected
        for bindings in (c["HostConfig"]["PortBindings"] or {}).values()
        for b in bindings
        if b["HostIp"] != "127.0.0.1"
    ]
    # The official postgres and redis images start as root and step down to their own users themselves.
    assert not [n for n in root_users if not any(s in n for s in ("postgres", "redis"))], root_users
    assert writable == [], writable
    assert published == []


def test_new_weights_reach_traefik_through_the_shared_volume(compose_stack):
    """PUT /api/traffic in the control-plane container; Traefik (another container) follows the rename."""
    token = compose_stack.api_token
    import urllib.request

    def put(weights: dict[str, int]) -> None:
        req = urllib.request.Request(
            f"{compose_stack.control_plane}/api/traffic",
            data=json.dumps({"weights": weights}).encode(),
            method="PUT",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200

    delays = []
    for _ in range(5):
        put({"baseline": 90, "canary": 0, "control": 10})
        t0 = time.monotonic()

        def no_canary_in_a_row() -> bool:
            return all(compose_stack.predict()[1].get("x-model-role") != "canary" for _ in range(30))

        wait_for(no_canary_in_a_row, 30, "canary's weight 0 in force")
        delays.append(time.monotonic() - t0)
        put(SPLIT)
        wait_for(
            lambda: any(compose_stack.predict()[1].get("x-model-role") == "canary" for _ in range(40)),
            30,
            "canary's weight back",
        )
    print(
        f"\nnew weights in force after (s, includes 30 requests to check): {sorted(round(d, 2) for d in delays)}"
    )


def test_a_killed_bento_container_is_restarted_and_costs_at_most_two_seconds_of_its_share(compose_stack):
    before = _weights(compose_stack)
    baseline = _roles(compose_stack)["baseline"]
    name = f"{compose_stack.project}-bento-v{baseline}"
    restarts = int(compose_stack.docker("inspect", "-f", "{{.RestartCount}}", name))
    killed_at: list[float] = []
    back_at: list[float] = []

    def baseline_answers() -> bool:
        status, headers = compose_stack.predict({"X-Model-Role": "baseline"})
        return status == 200 and headers.get("x-model-version") == str(baseline)

    def kill_then_watch() -> None:
        time.sleep(5)
        pid = int(compose_stack.docker("inspect", "-f", "{{.State.Pid}}", name))
        os.kill(pid, signal.SIGKILL)  # a crash: the restart policy, not a person, brings it back
        killed_at.append(time.monotonic())
        time.sleep(1)  # the override header goes to the killed Bento alone: it answers once it is back
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not baseline_answers():
            time.sleep(0.25)
        back_at.append(time.monotonic())

    watcher = threading.Thread(target=kill_then_watch)
    watcher.start()
    results = _paced_load(compose_stack, 30, 40, f"kill-{uuid.uuid4().hex[:8]}-")
    watcher.join()
    assert baseline_answers(), "the killed Bento did not serve again within 90 s"
    back_after_s = back_at[0] - killed_at[0]
    failed = [r for r in results if r[1] != 200]
    print(
        f"\nkilled {name}: {len(failed)} of {len(results)} requests failed at 30/s; "
        f"serving again {back_after_s:.1f} s after the kill"
    )
    assert len(failed) <= 2 * 30 * SPLIT["baseline"] / 100, failed[:10]
    assert int(compose_stack.docker("inspect", "-f", "{{.RestartCount}}", name)) > restarts
    assert _weights(compose_stack) == before


def test_postgres_restarted_loses_no_logged_prediction(compose_stack):
    prefix = f"pg-{uuid.uuid4().hex[:8]}-"
    restarter = threading.Thread(target=lambda: (time.sleep(3), compose_stack.compose("restart", "postgres")))
    restarter.start()
    results = _paced_load(compose_stack, 20, 20, prefix)
    restarter.join()
    answered = sum(1 for _, status, _ in results if status == 200)
    assert answered >= len(results) - 5, Counter(status for _, status, _ in results)
    wait_for(lambda: _logged(compose_stack, prefix) >= answered, 180, "every answered request logged")
    assert len(_roles(compose_stack)) == 3


def test_rows_spilled_by_a_bento_that_dies_are_replayed_by_its_restarted_container(compose_stack):
    """Postgres down: the baseline's Bento answers and spills to the project's spill volume; killed, its
    container restarted by the restart policy finds the files and replays them once Postgres is back."""
    prefix = f"spill-{uuid.uuid4().hex[:8]}-"
    baseline = _roles(compose_stack)["baseline"]
    name = f"{compose_stack.project}-bento-v{baseline}"
    compose_stack.compose("stop", "postgres")
    try:
        answered = 0
        for i in range(100):
            status, headers = compose_stack.predict(
                {"X-Request-Id": f"{prefix}{i}", "X-Model-Role": "baseline"}
            )
            answered += status == 200 and headers.get("x-model-version") == str(baseline)
        assert answered == 100
        spilled = f'test -n "$(ls -A /var/spool/recsys/v{baseline} 2>/dev/null)"'
        wait_for(
            lambda: subprocess.run([DOCKER, "exec", name, "sh", "-c", spilled]).returncode == 0,
            60,
            "the baseline's rows in its spill directory",
        )
        time.sleep(2)  # the spill file's last rows written before the kill
        os.kill(int(compose_stack.docker("inspect", "-f", "{{.State.Pid}}", name)), signal.SIGKILL)
    finally:
        compose_stack.compose("start", "postgres")
    wait_for(lambda: _logged(compose_stack, prefix) == 100, 180, "the 100 spilled rows replayed")


def test_the_demo_story_runs_in_containers_and_moves_mlflow_aliases(compose_stack):
    """A better canary promoted and a worse one rolled back, decided by the containerized worker."""
    before = _roles(compose_stack)
    # The p99 guardrail at 2x, as tests/e2e/test_story.py says why: at the demo's 1.5x the last step held
    # for the whole 600 s on this shared machine (upper bound of the ratio 3.7 -> 1.8, never <= 1.5).
    run = compose_stack.recsys(
        "demo",
        *("--users", "8", "--interval", "2", "--step-seconds", "6", "--p99-ratio", "2.0", "--timeout", "600"),
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "The story ended as expected." in run.stdout
    after = _roles(compose_stack)
    assert after["baseline"] != before["baseline"]
    alias = compose_stack.mlflow_json("/api/2.0/mlflow/registered-models/alias?name=recsys&alias=baseline")
    assert int(alias["model_version"]["version"]) == after["baseline"]
    evaluations = compose_stack.compose("logs", "--no-color", "worker").stdout
    assert "control_plane.jobs" in evaluations
    rows = compose_stack.sql("SELECT candidate_version, phase FROM rollouts ORDER BY id")
    phases = [r.split("\t")[1] for r in rows]
    assert phases[-2:] == ["promoted", "rolled_back"], rows
    rolled_back = int(rows[-1].split("\t")[0])
    assert f"{compose_stack.project}-bento-v{rolled_back}" not in compose_stack.bento_containers()
    # its image went with its container
    assert not any(i.startswith(f"recsys-bento:v{rolled_back}@") for i in compose_stack.bento_images())


def test_recsys_deploy_runs_a_new_container_for_a_role(compose_stack):
    roles = _roles(compose_stack)
    old_control = roles["control"]
    candidate = max(int(v) for v in compose_stack.sql("SELECT DISTINCT candidate_version FROM rollouts"))
    run = compose_stack.recsys("deploy", "--version", str(candidate), "--role", "control", timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    status, headers = compose_stack.predict({"X-Model-Role": "control"})
    assert (status, headers.get("x-model-version")) == (200, str(candidate))
    assert f"{compose_stack.project}-bento-v{candidate}" in compose_stack.bento_containers()
    assert _roles(compose_stack)["control"] == candidate != old_control


def test_compose_down_leaves_no_container_network_volume_or_bento_image(compose_stack):
    compose_stack.compose("down", "--remove-orphans", "--volumes", "--timeout", "10")
    compose_stack.remove_bento_images()
    assert compose_stack.bento_images() == []
    label = f"label=com.docker.compose.project={compose_stack.project}"
    assert compose_stack.docker("ps", "-a", "--filter", label, "--format", "{{.Names}}") == ""
    assert compose_stack.docker("network", "ls", "--filter", label, "--format", "{{.Name}}") == ""
    assert compose_stack.docker("volume", "ls", "--filter", label, "--format", "{{.Name}}") == ""
