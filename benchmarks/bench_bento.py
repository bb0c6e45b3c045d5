"""Throughput and latency of one Bento's /predict, prediction log on vs off (a script, not a test).

    .venv/bin/python benchmarks/bench_bento.py [--bento recsys:v3] [--connections 1,16] [--duration 10] [--rounds 3]

Without --bento it trains the `baseline` profile into a temporary MLflow store and builds its Bento in
a temporary BENTOML_HOME. It starts that Bento twice (RECSYS_PREDLOG=on and =off, both writing to a
temporary SQLite database unless --database-url is given), drives /predict with wrk (or, without
wrk, an asyncio/httpx loop that is itself the bottleneck), alternating the two servers run by run,
and prints the median requests/s, p50 and p99 of each. It also times CatBoost's own single-row
predict in this process, so that what the service adds per request is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
FEATURES = [0.6, 1.2, 0.3, 1.6, 0.25, 28.0, 40.0, 4.2, 0.1, 0.4, 1.0, 0.5, -0.8, 0.0, 2.0, 1.0]


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses and socket errors
    requests: int = 0  # responses wrk completed
    non_2xx: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_bento(workdir: Path, env: dict[str, str]) -> str:
    """Train, register and build a Bento in the temporary stores; return its tag."""
    return prepare_bentos(workdir, env, ("baseline",))[0]


def prepare_bentos(workdir: Path, env: dict[str, str], profiles: tuple[str, ...]) -> list[str]:
    """Train and register one version per profile and build its Bento, in one child process; the tags."""
    code = (
        "import sys\n"
        "from training.train import train_and_register\n"
        "from bentos.build import build_bento\n"
        f"uri = {env['MLFLOW_TRACKING_URI']!r}\n"
        f"for profile in {list(profiles)!r}:\n"
        f"    v = train_and_register(tracking_uri=uri, artifact_location={str(workdir / 'mlartifacts')!r},"
        " profile=profile, progress=False)\n"
        "    print('BENTO', build_bento(v, tracking_uri=uri), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"training or building failed:\n{out.stderr[-3000:]}")
    return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("BENTO ")]


def model_dir(env: dict[str, str], bento: str) -> Path:
    """Where the Bento's MLflow model sits in the BentoML model store (recsys:v3 -> recsys-model/v3)."""
    name, version = bento.split(":")
    home = Path(env.get("BENTOML_HOME") or Path.home() / "bentoml")
    return home / "models" / f"{name}-model" / version / "mlflow_model"


def catboost_single_row_us(path: Path, n: int = 20_000) -> float:
    """Median of 5 timings of the service's own single-row scoring call, in microseconds."""
    from bentos.model import CatBoostScorer

    scorer = CatBoostScorer.from_mlflow_dir(path)
    for _ in range(1000):
        scorer.score_one(FEATURES)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            scorer.score_one(FEATURES)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def start_bento(stack: ExitStack, bento: str, env: dict[str, str], log_path: Path) -> str:
    url, proc = spawn_bento(stack, bento, env, log_path)
    wait_ready(url, proc, log_path)
    return url


# Every server and every wrk run of a benchmark starts in a session of its own. Where the kernel
# groups tasks by session for scheduling (`sched_autogroup`, on here and in many distributions'
# kernels), wrk sharing the benchmark's session competed task by task with every process of the setup
# it drove: with the seven busy processes behind the gateway against two behind the peer, wrk itself
# waited longer to run, and that wait is in every latency it measures. A client on another machine
# does not share the servers' run queue; in a session of its own wrk is closer to that, alike for
# every setup. Two runs of `/predict` c8, one after the other (docs/performance.md): the gateway's p99
# 9.4 -> 7.1 ms, the two-worker peer's 6.7 -> 6.2 ms.
OWN_SESSION = True


def spawn_bento(
    stack: ExitStack, bento: str, env: dict[str, str], log_path: Path
) -> tuple[str, subprocess.Popen]:
    """Start `bentoml serve` (stopped when `stack` closes) without waiting for it; its URL and process."""
    port = free_port()
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [str(VENV_BIN / "bentoml"), "serve", bento, "--port", str(port), "--host", "127.0.0.1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=OWN_SESSION,
        )
    stack.callback(stop_process, proc)
    return f"http://127.0.0.1:{port}", proc


def stop_process(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(
    url: str, proc: subprocess.Popen, log_path: Path, path: str = "/readyz", timeout_s: float = 180
) -> None:
    """Until GET `url + path` answers 200; exits if the process dies or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:3]} exited; see {log_path}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s; see {log_path}")


LUA = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""


def run_wrk(
    url: str, connections: int, duration_s: float, script: Path, path: str = "/predict", *script_args: str
) -> Run:
    """One wrk run (one thread: wrk shares the cores with the servers) and its parsed summary."""
    args = ["--", *script_args] if script_args else []
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s:g}s",
            "--latency",
            "-s",
            str(script),
            f"{url}{path}",
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        start_new_session=OWN_SESSION,
    ).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non_2xx = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errors = non_2xx + sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return Run(
        rps=rps, p50_ms=latency("50"), p99_ms=latency("99"), errors=errors, requests=requests, non_2xx=non_2xx
    )


def run_httpx(url: str, connections: int, duration_s: int, _script: Path) -> Run:
    import asyncio

    import httpx

    async def drive() -> Run:
        latencies: list[float] = []
        errors = 0
        body = json.dumps({"features": FEATURES}).encode()
        headers = {"content-type": "application/json"}
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            end = time.monotonic() + duration_s

            async def worker() -> None:
                nonlocal errors
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    r = await client.post("/predict", content=body, headers=headers)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    errors += r.status_code != 200

            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.monotonic() - t0
        q = statistics.quantiles(latencies, n=100)
        return Run(rps=len(latencies) / elapsed, p50_ms=q[49], p99_ms=q[98], errors=errors)

    return asyncio.run(drive())


def gc_pauses(url: str) -> str:
    """Count and total of the generation-2 collections the server reported (recsys_gc_pause_seconds)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = re.search(r'^recsys_gc_pause_seconds_count\{generation="2"\} ([\d.e+]+)', text, re.M)
    total = re.search(r'^recsys_gc_pause_seconds_sum\{generation="2"\} ([\d.e+-]+)', text, re.M)
    if not count:
        return "none"
    return f"{float(count.group(1)):.0f}, {float(total.group(1)) * 1000:.0f} ms in all"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bento", help="an existing Bento tag (default: train and build one in a temp store)"
    )
    parser.add_argument("--connections", default="1,16", help="comma-separated connection counts")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode and connection count")
    parser.add_argument("--database-url", help="where the 'on' server logs (default: a temp SQLite file)")
    args = parser.parse_args(argv)

    from control_plane.db.engine import make_engine, migrate

    with tempfile.TemporaryDirectory(prefix="bench-bento-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "RECSYS_STATE_DIR": str(workdir / "state")}
        if not args.bento:
            env["BENTOML_HOME"] = str(workdir / "bentoml")
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
            print("training and building a Bento in", workdir, flush=True)
        bento = args.bento or prepare_bento(workdir, env)
        database_url = args.database_url or f"sqlite:///{workdir / 'state' / 'recsys.db'}"
        migrate(database_url)
        env["DATABASE_URL"] = database_url
        env["RECSYS_SPILL_DIR"] = str(workdir / "spill")

        urls = {
            mode: start_bento(
                stack,
                bento,
                # Two servers of one version: each needs its own metrics directory.
                {**env, "RECSYS_PREDLOG": mode, "RECSYS_PROMETHEUS_DIR": str(workdir / f"prometheus-{mode}")},
                workdir / f"serve-{mode}.log",
            )
            for mode in ("on", "off")
        }
        script = workdir / "predict.lua"
        script.write_text(LUA % json.dumps({"features": FEATURES}))
        runner = run_wrk if shutil.which("wrk") else run_httpx
        load_before = os.getloadavg()[0]
        print(f"{bento}: load from {'wrk' if runner is run_wrk else 'httpx (the client is the bottleneck)'}")
        for url in urls.values():
            runner(url, 4, 2, script)  # warm up

        results: dict[tuple[int, str], list[Run]] = {}
        for connections in (int(c) for c in args.connections.split(",")):
            for r in range(args.rounds):
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    run = runner(urls[mode], connections, args.duration, script)
                    results.setdefault((connections, mode), []).append(run)
                    print(f"  c={connections:<3} log={mode:<3} {run.rps:8.0f} req/s  p50 {run.p50_ms:6.2f} ms"
                          f"  p99 {run.p99_ms:6.2f} ms  errors {run.errors}", flush=True)  # fmt: skip

        model_us = catboost_single_row_us(model_dir(env, bento))
        print(
            f"\nmedians of {args.rounds} runs of {args.duration}s, {os.cpu_count()} cores shared by server and load;"
            f" load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        )
        print(f"{'conns':>5} {'log':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'us/req':>7} {'errors':>6}")
        for (connections, mode), runs in results.items():
            rps = statistics.median(r.rps for r in runs)
            print(
                f"{connections:>5} {mode:>4} {rps:8.0f} {statistics.median(r.p50_ms for r in runs):7.2f}"
                f" {statistics.median(r.p99_ms for r in runs):7.2f} {1e6 / rps:7.0f} {sum(r.errors for r in runs):6d}"
            )
        print(f"CatBoost single-row predict_proba in this process: {model_us:.0f} us "
              f"(the rest of us/req is HTTP, BentoML, validation, logging)")  # fmt: skip

        for mode, url in urls.items():
            print(f"log={mode}: full GC pauses {gc_pauses(url)}")

        engine = make_engine(database_url)
        with engine.connect() as conn:
            from sqlalchemy import func, select

            from control_plane.db.schema import predictions

            rows = conn.execute(select(func.count()).select_from(predictions)).scalar_one()
        engine.dispose()
        print(f"rows in predictions after the runs (log=on server only): {rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
