"""Does BentoML's adaptive batching beat the Bento's direct path? (a script, for docs/performance.md)

    .venv/bin/python benchmarks/bench_batching.py --work-dir DIR [--settings 32:5,64:20] [--duration 6] [--repeats 3]

DIR is a `benchmarks/bench.py --work-dir` (its BENTOML_HOME has recsys:v2 and its model). It starts the
Bento recsys:v2 (prediction log off) and one benchmarks/batching_experiment.py server per max_batch_size:
max_latency_ms setting, all side by side, and drives /predict at 1 and 32 connections and 100-row
scoring at 8 with wrk, alternating the servers; it prints medians of requests/s, p50, p99, CPU per
request and non-2xx responses (a batch that would miss max_latency_ms is refused with 503).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from bench import LUA, cpu_by_pid
from bench_bento import VENV_BIN, free_port, run_wrk, spawn_bento, stop_process, wait_ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument(
        "--settings", default="32:5,64:20", help="max_batch_size:max_latency_ms, comma-separated"
    )
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "RECSYS_PREDLOG": "off", "RECSYS_PROMETHEUS_DIR": str(work / "prometheus-batching"),
           "DATABASE_URL": f"sqlite:///{work / 'batching.db'}"}  # fmt: skip
    features = json.loads((work / "predict.json").read_text())["features"]
    rows = [c["features"] for c in json.loads((work / "recommend.json").read_text())["candidates"]]
    (work / "batch1.json").write_text(json.dumps({"rows": [features]}))
    (work / "batch100.json").write_text(json.dumps({"rows": rows}))
    with ExitStack() as stack:
        url, proc = spawn_bento(stack, "recsys:v2", env, work / "serve-batching-direct.log")
        servers = {
            "direct (no batching)": (url, proc, "/predict", "/recommend", "predict.json", "recommend.json")
        }
        for setting in args.settings.split(","):
            size, latency = setting.split(":")
            port = free_port()
            log = work / f"serve-batching-{size}-{latency}.log"
            with open(log, "w") as out:
                p = subprocess.Popen(
                    [str(VENV_BIN / "bentoml"), "serve", "batching_experiment:RecsysBatched",
                     "--port", str(port), "--host", "127.0.0.1"],
                    env={**env, "RECSYS_BATCH_MAX_SIZE": size, "RECSYS_BATCH_MAX_LATENCY_MS": latency},
                    cwd=Path(__file__).resolve().parent, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            stack.callback(stop_process, p)
            servers[f"batchable {size} rows / {latency} ms"] = (
                f"http://127.0.0.1:{port}", p, "/predict_batch", "/score_batch", "batch1.json", "batch100.json")  # fmt: skip
        for url, p, *_rest in servers.values():
            wait_ready(url, p, work / "serve-batching.log")
        results: dict[tuple[str, str], list] = {}
        loads = (("/predict c1", 1, 0), ("/predict c32", 32, 0), ("100 rows c8", 8, 1))
        for r in range(args.repeats):
            names = list(servers)[r % len(servers) :] + list(servers)[: r % len(servers)]
            for label, conns, which in loads:
                for name in names:
                    url, p, predict_path, score_path, predict_body, score_body = servers[name]
                    path, body = (predict_path, predict_body) if which == 0 else (score_path, score_body)
                    c0 = cpu_by_pid([p.pid])
                    run = run_wrk(url, conns, args.duration, LUA, path, str(work / body))
                    time.sleep(0.3)
                    cpu = sum(cpu_by_pid([p.pid]).values()) - sum(c0.values())
                    results.setdefault((label, name), []).append((run, cpu / max(run.requests, 1) * 1e6))
        print(f"medians of {args.repeats} runs of {args.duration:g} s; load average {os.getloadavg()[0]:.1f}")
        print("| load | server | req/s | p50 ms | p99 ms | CPU µs/req | non-2xx |")
        print("|---|---|--:|--:|--:|--:|--:|")
        for (label, name), runs in results.items():
            med = statistics.median
            print(f"| {label} | {name} | {med(x.rps for x, _ in runs):,.0f} | {med(x.p50_ms for x, _ in runs):.2f}"
                  f" | {med(x.p99_ms for x, _ in runs):.2f} | {med(c for _, c in runs):.0f}"
                  f" | {sum(x.non_2xx for x, _ in runs)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
