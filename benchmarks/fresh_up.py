"""`recsys up` on a fresh state directory, N times in a row, while busy loops keep every core loaded.

    .venv/bin/python benchmarks/fresh_up.py [--runs 10] [--busy 2] [--keep DIR]

Each run gets a new state directory and free ports, runs `recsys up` (which trains and registers three
versions, builds three Bentos and starts the whole stack), checks that the gateway answers, the MLflow
server asks for credentials and `recsys status` shows every process running, then `recsys down`.
It prints one line a run and the count of clean starts; it exits non-zero unless every run succeeded.
Issue #25's target: 10 out of 10 with another CPU-heavy job running (the race it guards against was
`sqlite3.OperationalError: no such column: spans.dimension_attributes`, MLflow's store made twice at once).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RECSYS = str(Path(sys.executable).with_name("recsys"))
PROGRAMS = ("traefik", "control-plane", "worker", "scheduler", "redis", "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_loop() -> None:
    while True:
        pass


def stack_env(state: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "RECSYS_STATE_DIR": str(state),
        "BENTOML_HOME": str(state / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "RECSYS_BENTO_BASE_PORT": str(random.randrange(31000, 39000, 20)),
    }
    for name in (
        "GATEWAY",
        "TRAEFIK_API",
        "CONTROL_PLANE",
        "MLFLOW",
        "PROMETHEUS",
        "EMBEDDED_REDIS",
        "WORKER_METRICS",
    ):
        env[f"RECSYS_{name}_PORT"] = str(free_port())
    for key in ("DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI", "TRAFFIC_WEIGHTS"):
        env.pop(key, None)
    return env


def http_status(url: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def checks(env: dict[str, str], cwd: Path) -> list[str]:
    """What is wrong with the stack that `recsys up` says is up (empty: nothing)."""
    problems = []
    body = json.dumps({"features": [0.0] * 16}).encode()
    if http_status(f"http://127.0.0.1:{env['RECSYS_GATEWAY_PORT']}/predict", body) != 200:
        problems.append("the gateway does not answer /predict with 200")
    if (
        http_status(
            f"http://127.0.0.1:{env['RECSYS_MLFLOW_PORT']}/api/2.0/mlflow/experiments/search?max_results=1"
        )
        != 401
    ):
        problems.append("the MLflow server answers without credentials")
    status = subprocess.run(
        [RECSYS, "status", "--json"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    states = {n: p["state"] for n, p in json.loads(status.stdout or "{}").get("processes", {}).items()}
    not_running = [n for n in PROGRAMS if states.get(n) != "RUNNING"]
    if not_running:
        problems.append(f"not running: {not_running}")
    return problems


def one_run(root: Path, i: int, keep: bool) -> tuple[bool, float, str]:
    work = root / f"run-{i:02d}"
    state = work / ".recsys"
    work.mkdir(parents=True)
    env = stack_env(state)
    t0 = time.monotonic()
    try:
        up = subprocess.run([RECSYS, "up"], env=env, cwd=work, capture_output=True, text=True, timeout=1200)
        took = time.monotonic() - t0
        if up.returncode != 0:
            tail = (up.stderr or up.stdout).strip().splitlines()[-3:]
            return False, took, f"recsys up exited {up.returncode}: {' | '.join(tail)}"
        problems = checks(env, work)
        return not problems, took, "; ".join(problems) or "ok"
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - t0, "recsys up did not finish within 20 minutes"
    finally:
        subprocess.run([RECSYS, "down"], env=env, cwd=work, capture_output=True, timeout=300)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--busy", type=int, default=os.cpu_count() or 2, help="busy-loop processes (default: one a core)"
    )
    p.add_argument("--keep", default="", help="keep each run's state directory under this directory")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="recsys-fresh-up-"))
    busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for b in busy:
        b.start()
    results = []
    try:
        for i in range(args.runs):
            ok, took, what = one_run(root, i, bool(args.keep))
            results.append((ok, took))
            print(f"run {i + 1:2d}/{args.runs}: {'ok  ' if ok else 'FAIL'} {took:6.1f} s  {what}", flush=True)
    finally:
        for b in busy:
            b.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    good = sum(ok for ok, _ in results)
    took = [t for _, t in results]
    print(
        f"{good} of {len(results)} fresh `recsys up` runs succeeded with {args.busy} busy loops running; "
        f"recsys up took a median of {statistics.median(took):.0f} s (min {min(took):.0f}, max {max(took):.0f})"
    )
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
