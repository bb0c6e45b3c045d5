"""`make bench`: the gateway path against a plain in-process peer, side by side on this machine (a script).

    .venv/bin/python benchmarks/bench.py [--duration 8] [--repeats 3] [--database postgres|sqlite] [--out bench-results]

It trains three versions (profiles control, baseline, better) into a temporary MLflow store, builds
their Bentos in a temporary BENTOML_HOME and starts, all at once:

  gateway        Traefik (the stack's static config, weights 85/10/5) over three `bentoml serve`,
                 prediction log on, into a fresh Postgres database (or SQLite with --database sqlite)
  gateway-nolog  the same with RECSYS_PREDLOG=off (what the log costs; /predict at 8 connections only,
                 and one more pair of runs, log on and off back to back, at the end of each repeat)
  bento          the gateway's baseline Bento, directly
  peer-1w/-2w    benchmarks/peer_app.py: one FastAPI app, the three models in process, a weighted random
                 choice, one and two uvicorn workers

then drives each with wrk (/predict at 1, 8 and 32 connections, /recommend with 100 candidates at
8), alternating the setups run by run and repeating every run. It prints and writes to
bench-results/ (bench.md, bench.json, bench.png) the medians of requests/s, p50 and p99, the ratios to
the peer, CPU per request (every process of the setup, children included; the Postgres backends of the
benchmark database apart), memory per process and how many of the 2xx responses reached the database.
docs/performance.md explains the numbers and the settings they led to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_bento import FEATURES, prepare_bentos, run_wrk
from bench_setups import (
    PROFILES,
    Database,
    Setup,
    create_database,
    db_backend_pids,
    postgres_reachable,
    seed_roles,
    spawn_bentos,
    spawn_peer,
    spawn_traefik,
    thread_schedstat,
    wait_gateway,
)

LUA = Path(__file__).resolve().parent / "wrk" / "post_json.lua"
N_CANDIDATES = 100


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    connections: int
    body: str  # file name in the work directory
    setups: tuple[str, ...] | None = None  # None: every main setup


@dataclass
class Sample:
    """One wrk run of one setup, with what the setup spent on it."""

    setup: str
    workload: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    ok: int  # 2xx responses wrk saw
    cpu_s: float  # CPU of the setup's processes during the run
    proxy_cpu_s: float | None = None  # of which Traefik's
    db_cpu_s: float | None = None  # CPU of the Postgres backends serving the benchmark database
    server_ok: int | None = None  # 2xx responses the Bentos counted
    rows: int | None = None  # predictions rows written for the run
    log_cpu_s: float | None = None  # of cpu_s, the prediction log's writer processes'
    wait_s: float | None = None  # time the setup's threads spent runnable, waiting for a core


MAIN_SETUPS = ("gateway", "bento", "peer-1w", "peer-2w")
WORKLOADS = (
    Workload("predict c1", "/predict", 1, "predict.json"),
    Workload("predict c8", "/predict", 8, "predict.json", (*MAIN_SETUPS, "gateway-nolog")),
    Workload("predict c32", "/predict", 32, "predict.json"),
    Workload("recommend100 c8", "/recommend", 8, "recommend.json"),
)
# The log's cost is the least steady figure (docs/performance.md): besides the gateway-nolog runs of
# "predict c8", each repeat ends with one more pair of runs, log on and off back to back.
LOG_PAIR = Workload("log pair c8", "/predict", 8, "predict.json", ("gateway", "gateway-nolog"))
WRITER_MODULE = "bentos.predlog_process"


# ---- what the processes spend -------------------------------------------------------------------


def _tree(pids: list[int]):
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return procs


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for p in _tree(pids):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def run_queue_wait_by_tid(pids: list[int]) -> dict[int, float]:
    """Seconds each thread of the setup's processes has waited on a run queue for a core so far."""
    return {tid: waited for p in _tree(pids) for tid, (_, waited) in thread_schedstat(p.pid).items()}


def writer_pids(pids: list[int]) -> set[int]:
    """The prediction log's writer processes among the process trees of `pids`."""
    import psutil

    out = set()
    for p in _tree(pids):
        try:
            if WRITER_MODULE in p.cmdline():
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def db_backend_cpu(db: Database) -> dict[int, float]:
    """CPU of the Postgres server processes whose title names the benchmark database ({} for SQLite)."""
    import psutil

    out = {}
    for pid in db_backend_pids(db):
        with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def memory(pids: list[int]) -> list[dict]:
    """RSS and USS (memory no other process shares) of every process of a setup, in MB."""
    import psutil

    rows = []
    for p in _tree(pids):
        try:
            info = p.memory_full_info()
            cmd = " ".join(p.cmdline()[:4])
            rows.append(
                {"pid": p.pid, "cmd": cmd[:90], "rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rows


def served_2xx(bento_urls: list[str]) -> int:
    """2xx responses the Bentos counted (recsys_requests_total)."""
    import httpx

    total = 0.0
    for url in bento_urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for m in re.finditer(r'^recsys_requests_total\{[^}]*status="2\d\d"[^}]*\} (\S+)$', text, re.M):
            total += float(m.group(1))
    return int(total)


def count_rows(engine) -> int:
    from sqlalchemy import func, select

    from control_plane.db.schema import predictions

    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(predictions)).scalar_one()


def wait_rows(engine, at_least: int, before: int, timeout_s: float = 15.0) -> int:
    """Rows written since `before`, once at least `at_least` are in and the count has settled."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        n = count_rows(engine) - before
        if (n >= at_least and n == last) or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.2)


# ---- the runs -----------------------------------------------------------------------------------


def measure(
    setup: Setup,
    workload: Workload,
    args,
    workdir: Path,
    db: Database,
    engine,
    duration_s: float | None = None,
) -> Sample:
    cpu0, db0, wait0 = cpu_by_pid(setup.pids), db_backend_cpu(db), run_queue_wait_by_tid(setup.pids)
    if setup.logs:
        rows0, ok0 = count_rows(engine), served_2xx(setup.bento_urls)
    run = run_wrk(
        setup.url,
        workload.connections,
        duration_s or args.duration,
        LUA,
        workload.path,
        str(workdir / workload.body),
    )
    time.sleep(0.5)  # responses in flight when wrk stopped, and the log writer's last batch
    cpu1, db1, wait1 = cpu_by_pid(setup.pids), db_backend_cpu(db), run_queue_wait_by_tid(setup.pids)
    sample = Sample(
        setup=setup.name,
        workload=workload.name,
        rps=run.rps,
        p50_ms=run.p50_ms,
        p99_ms=run.p99_ms,
        requests=run.requests,
        errors=run.errors,
        ok=run.requests - run.non_2xx,
        cpu_s=_delta(cpu0, cpu1),
        wait_s=_delta(wait0, wait1) if wait1 else None,
    )
    if setup.proxy_pid is not None:
        sample.proxy_cpu_s = cpu1.get(setup.proxy_pid, 0.0) - cpu0.get(setup.proxy_pid, 0.0)
    if setup.logs:
        sample.server_ok = served_2xx(setup.bento_urls) - ok0
        sample.rows = wait_rows(engine, max(sample.server_ok, sample.ok), rows0)
        writers = writer_pids(setup.pids)
        sample.log_cpu_s = sum(cpu1.get(pid, 0.0) - cpu0.get(pid, 0.0) for pid in writers)
        if db.kind == "postgres":
            sample.db_cpu_s = _delta(db0, db1)
    return sample


def bodies(workdir: Path) -> None:
    (workdir / "predict.json").write_text(json.dumps({"features": FEATURES}))
    candidates = [
        {"item_id": f"item-{i:03d}", "features": [round(f * (1 + 0.01 * i), 4) for f in FEATURES]}
        for i in range(N_CANDIDATES)
    ]
    (workdir / "recommend.json").write_text(json.dumps({"candidates": candidates, "k": 10}))


def prepare(workdir: Path, env: dict[str, str]) -> dict[str, str]:
    """role -> Bento tag, trained and built in the work directory (reused when it has them already)."""
    saved, source = workdir / "bentos.json", _bento_source_digest()
    if saved.exists():
        kept = json.loads(saved.read_text())
        if kept.get("source") == source:  # Bentos carry a copy of their code: stale ones are rebuilt
            return kept["tags"]
    tags = dict(zip(PROFILES, prepare_bentos(workdir, env, tuple(PROFILES.values())), strict=True))
    saved.write_text(json.dumps({"source": source, "tags": tags}))
    return tags


def _bento_source_digest() -> str:
    """A digest of the files every Bento is built from (bentofile.yaml and what the service imports)."""
    import hashlib

    from bentos.build import PROJECT_DIR, bento_sources

    digest = hashlib.sha256()
    for name in ["bentofile.yaml", *bento_sources()]:
        digest.update(name.encode() + b"\0" + (PROJECT_DIR / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Variant:
    """An extra gateway for an experiment (`--variant 'gw-2w:bento:BENTOML_CONFIG_OPTIONS=...'`)."""

    name: str
    bento_env: dict[str, str]
    traefik_env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, target, assignments = text.split(":", 2)
        env = dict(a.split("=", 1) for a in assignments.split(";") if a)
        if target not in ("bento", "traefik"):
            raise SystemExit(f"--variant {text!r}: the target is 'bento' or 'traefik'")
        return cls(name, env if target == "bento" else {}, env if target == "traefik" else {})


def start_all(
    stack: ExitStack,
    workdir: Path,
    env: dict[str, str],
    tags: dict[str, str],
    db: Database,
    variants: list[Variant],
) -> dict[str, Setup]:
    """Every setup, started together: the gateway (log on, off, and any variants), the peers."""
    versions = {role: int(tag.rsplit(":v", 1)[1]) for role, tag in tags.items()}
    seed_roles(db.url, versions)
    bento_env = {**env, "DATABASE_URL": db.url, "RECSYS_SPILL_DIR": str(workdir / "spill")}
    gateways = [
        Variant("gateway", {"RECSYS_PREDLOG": "on"}, {}),
        Variant("gateway-nolog", {"RECSYS_PREDLOG": "off"}, {}),
        *(Variant(v.name, {"RECSYS_PREDLOG": "on", **v.bento_env}, v.traefik_env) for v in variants),
    ]
    bentos = {
        g.name: spawn_bentos(stack, tags, {**bento_env, **g.bento_env}, workdir, g.name) for g in gateways
    }
    peers = {n: spawn_peer(stack, workdir, env, tags, versions, n) for n in (1, 2)}
    for proc in [*(p for b in bentos.values() for p in b.values()), *peers.values()]:
        proc.wait()
    proxies = {
        g.name: spawn_traefik(stack, workdir, g.name, bentos[g.name], versions, g.traefik_env)
        for g in gateways
    }
    body = (workdir / "predict.json").read_bytes()
    for proc in proxies.values():
        wait_gateway(proc, body)

    def pids(procs) -> list[int]:
        return [p.popen.pid for p in procs]

    setups = {}
    for g in gateways:
        on, proxy = bentos[g.name], proxies[g.name]
        logs = g.bento_env.get("RECSYS_PREDLOG") != "off"
        setups[g.name] = Setup(
            g.name,
            proxy.url,
            pids([proxy, *on.values()]),
            logs=logs,
            bento_urls=[p.url for p in on.values()] if logs else [],
            bento_pids=pids(on.values()),
            proxy_pid=proxy.popen.pid,
        )
    baseline = bentos["gateway"]["baseline"]
    setups["bento"] = Setup(
        "bento",
        baseline.url,
        pids([baseline]),
        logs=True,
        bento_urls=[baseline.url],
        bento_pids=pids([baseline]),
    )
    for n, peer in peers.items():
        setups[f"peer-{n}w"] = Setup(f"peer-{n}w", peer.url, pids([peer]))
    return setups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8, help="seconds per wrk run (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every setup and workload (default 3)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), help="default: postgres when reachable")
    parser.add_argument("--out", default="bench-results", help="where bench.md, bench.json, bench.png go")
    parser.add_argument("--work-dir", help="keep models, Bentos and logs here (reused on the next run)")
    parser.add_argument("--only", help="comma-separated workload names, e.g. 'predict c8' (for profiling)")
    parser.add_argument(
        "--no-log-pairs",
        dest="log_pairs",
        action="store_false",
        help="skip the extra back-to-back pairs of runs, log on and off, that end each repeat",
    )
    parser.add_argument(
        "--log-pair-duration", type=float, default=6, help="seconds per run of those pairs (default 6)"
    )
    parser.add_argument("--pythonpath", help="prepended to every server's PYTHONPATH (an experiment)")
    parser.add_argument(
        "--setups", help=f"comma-separated setups to drive (default: {','.join(MAIN_SETUPS)})"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra gateway driven like the others: NAME:bento|traefik:KEY=VALUE[;KEY=VALUE], e.g."
        " 'gateway-2w:bento:BENTOML_CONFIG_OPTIONS=services.recsys.workers=2' or 'gateway-gmp1:traefik:GOMAXPROCS=1'",
    )
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: `make system-deps` (or apt-get install wrk)")

    from bench_report import write_report

    from control_plane.db.engine import make_engine

    started = time.monotonic()
    kind = args.database or ("postgres" if postgres_reachable() else "sqlite")
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    with ExitStack() as stack:
        workdir = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "BENTOML_DO_NOT_TRACK": "true",
            "BENTOML_HOME": str(workdir / "bentoml"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "RECSYS_STATE_DIR": str(workdir / "state"),
        }
        if args.pythonpath:  # e.g. a directory with uvloop and httptools, which uvicorn then uses
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (args.pythonpath, os.environ.get("PYTHONPATH")) if p
            )
        print(f"work directory {workdir}; training and building three versions", flush=True)
        tags = prepare(workdir, env)
        prepared_s = time.monotonic() - started
        bodies(workdir)
        db = create_database(stack, kind, workdir)
        print(
            f"{time.monotonic() - started:.0f} s: prediction log in {kind} ({db.name});"
            f" starting {3 * (2 + len(args.variant))} Bentos, {2 + len(args.variant)} Traefiks, 2 peers",
            flush=True,
        )
        variants = [Variant.parse(v) for v in args.variant]
        setups = start_all(stack, workdir, env, tags, db, variants)
        main_setups = [*(args.setups.split(",") if args.setups else MAIN_SETUPS), *(v.name for v in variants)]
        engine = make_engine(db.url)
        stack.callback(engine.dispose)
        ready_s = time.monotonic() - started
        print(f"{ready_s:.0f} s: all up; warming up", flush=True)
        for s in setups.values():  # warm up: imports, first requests, connection pools
            for w in ("predict.json", "recommend.json"):
                path = "/predict" if w == "predict.json" else "/recommend"
                run_wrk(s.url, 8, 1, LUA, path, str(workdir / w))

        samples: list[Sample] = []

        def run(r: int, w: Workload, name: str, duration_s: float | None = None) -> None:
            s = measure(setups[name], w, args, workdir, db, engine, duration_s)
            samples.append(s)
            print(
                f"  [{r + 1}/{args.repeats}] {w.name:<16} {name:<14} {s.rps:8.0f} req/s  p50 {s.p50_ms:6.2f}"
                f"  p99 {s.p99_ms:7.2f} ms  cpu {s.cpu_s / max(s.requests, 1) * 1e6:5.0f} us/req"
                f"  errors {s.errors}" + (f"  rows {s.rows}/{s.ok} 2xx" if s.rows is not None else ""),
                flush=True,
            )

        for r in range(args.repeats):
            for w in workloads:
                names = [n for n in (w.setups or MAIN_SETUPS) if n in main_setups or n == "gateway-nolog"]
                names += [v.name for v in variants]
                names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order each repeat
                for name in names:
                    run(r, w, name)
            if args.log_pairs and "gateway" in main_setups and any(w.name == "predict c8" for w in workloads):
                pair = LOG_PAIR.setups if r % 2 == 0 else LOG_PAIR.setups[::-1]
                for name in pair:
                    run(r, LOG_PAIR, name, args.log_pair_duration)
        mem = {name: memory(s.pids) for name, s in setups.items()}
        bento_mem = {
            name: [memory([pid]) for pid in s.bento_pids] for name, s in setups.items() if s.bento_pids
        }
        elapsed = time.monotonic() - started
        meta = {
            "duration_s": args.duration,
            "log_pair_duration_s": args.log_pair_duration if args.log_pairs else None,
            "repeats": args.repeats,
            "database": f"{kind} (a fresh database: {db.name})",
            "cores": os.cpu_count(),
            "load_average_end": os.getloadavg(),
            "prepare_s": round(prepared_s, 1),
            "startup_s": round(ready_s, 1),
            "elapsed_s": round(elapsed, 1),
            "bentos": tags,
        }
        out = Path(args.out)
        md = write_report(out, [asdict(s) for s in samples], mem, bento_mem, meta)
    print(md)
    print(f"written to {out}/bench.md, bench.json, bench.png in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
