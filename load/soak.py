"""`make soak`: the local stack held under steady load while a canary advances, with bounds that fail it.

    .venv/bin/python -m load.soak [--duration-s 300] [--users 12] [--think-s 0.5] [--out soak.md]

It starts the stack if it is not up (`recsys up`), runs Locust headless through the gateway (predictions,
recommendations and their labels, `load/locustfile.py`), starts a canary through the API after a warm-up
(the rollout goes on after the soak: watch it, or `recsys canary rollback --reason ...`), samples the memory of every
process of the stack (each supervisord program with its children) every 10 s for --duration-s, and at the
end prints a Markdown table of the figures, writes it to --out and exits 1 if a bound is broken:

- error rate (Locust failures over all requests, labels included) below --max-error-rate (0.1 %);
- no program's memory grows by more than --max-rss-growth-mb between the first sample (taken after the
  warm-up and the canary's start, once every code path has been imported) and the last one. Memory is the
  PSS of the program's processes (pages shared by forked workers count once), rq's short-lived work horses
  left out; a program restarted while it is sampled breaks the bound too (a restart would hide growth);
- every successful prediction has its row in `predictions` (weighted route), no more and no fewer.

tests/e2e/test_soak_short.py runs the same thing for 40 s with the same bounds.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.credentials import ensure_api_token
from control_plane.db.engine import make_engine
from control_plane.db.schema import predictions
from control_plane.settings import Settings
from control_plane.stack.local import gateway_answers, up
from control_plane.supervisor import Supervisor
from load.locust_process import start_locust

MB = 1024 * 1024
HORSE_MAX_AGE_S = 60
# A policy that moves the canary a step every 15 s on small samples and cannot promote within a short soak
# (promotion is only from the last of six steps).
SHORT_POLICY = {
    "steps": [30, 40, 50, 60, 70, 80],
    "step_min_duration_s": 15,
    "min_labelled_per_arm": 30,
    "min_requests_per_arm": 30,
    "min_latency_samples": 100,
    "expected_n": 2000,
    "harm_expected_n": 200,
    "p99_ratio": 1.5,
    "label_window_s": 1,
}
# The demo's pace for the five-minute soak: a step a minute, promotion possible at the end.
LONG_POLICY = {
    **SHORT_POLICY,
    "steps": [10, 25, 50],
    "step_min_duration_s": 60,
    "min_labelled_per_arm": 100,
    "min_requests_per_arm": 100,
}


@dataclass
class Bounds:
    max_error_rate: float = 0.001
    max_rss_growth_mb: float = 64.0


@dataclass
class Result:
    """Everything the soak measured."""

    duration_s: float  # of measured steady state, after the warm-up and the canary's start
    users: int
    wall_s: float = 0.0  # Locust's whole run
    requests: int = 0
    failures: int = 0
    predictions_ok: int = 0
    predictions_logged: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    rss_mb: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # program -> [(t, MB)]
    restarts: dict[str, int] = field(default_factory=dict)  # program -> pid changes seen
    canary: list[str] = field(default_factory=list)  # the rollout's ledger, oldest first
    failure_examples: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 1.0

    def growth_mb(self, program: str) -> float:
        series = self.rss_mb.get(program, [])
        return series[-1][1] - series[0][1] if len(series) > 1 else 0.0


# --- the stack's processes ---------------------------------------------------------------------------
def program_trees(settings: Settings) -> dict[str, list]:
    """supervisord program -> its process and every descendant (psutil.Process objects)."""
    import psutil

    out = {}
    for name, info in Supervisor(settings.state_dir).processes().items():
        if not info["pid"]:
            continue
        try:
            root = psutil.Process(info["pid"])
            out[name] = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return out


def _work_horse(p, now: float) -> bool:
    """A fork that runs one job and exits (rq forks one per job): its memory comes and goes with the job.

    Recognised as a child with its parent's command line that is younger than HORSE_MAX_AGE_S; gunicorn's
    workers are forks too, but they live on, so they are counted.
    """
    parent = p.parent()
    return parent is not None and now - p.create_time() < HORSE_MAX_AGE_S and p.cmdline() == parent.cmdline()


def _pss(p) -> int:
    """Proportional set size: pages shared with a parent (gunicorn and rq fork their workers) count once."""
    try:
        return p.memory_full_info().pss
    except (AttributeError, PermissionError):
        return p.memory_info().rss


class MemorySampler:
    """Samples the RSS of every program (summed over its processes) on a thread, every `every_s`."""

    def __init__(self, settings: Settings, every_s: float = 10.0) -> None:
        self.settings, self.every_s = settings, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self.pids: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        import psutil

        now = time.time()
        for name, procs in program_trees(self.settings).items():
            rss = 0
            for p in procs:
                try:
                    if _work_horse(p, now):
                        continue
                    rss += _pss(p)
                except psutil.NoSuchProcess:
                    continue
            self.samples.setdefault(name, []).append((now, rss / MB))
            self.pids.setdefault(name, set()).add(procs[0].pid)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sample()


# --- the control plane -------------------------------------------------------------------------------
def api(settings: Settings, method: str, path: str, body=None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{settings.control_plane_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ensure_api_token(settings)}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def canary_version(settings: Settings) -> int | None:
    """The version that holds the canary role now, else the newest one that holds no role."""
    status, traffic = api(settings, "GET", "/api/traffic")
    if traffic["versions"].get("canary"):
        return traffic["versions"]["canary"]
    _, versions = api(settings, "GET", "/api/versions")
    free = [v["version"] for v in versions["versions"] if not v["role"] and v["stage"] != "Archived"]
    return max(free) if free else None


def start_canary(settings: Settings, version: int, policy: dict) -> int:
    """A rollout of `version`, started through the API as an operator would."""
    _, rollouts = api(settings, "GET", "/api/rollouts?limit=1")
    if rollouts["active"]:
        # Ending it here and starting the same version at once races the scheduler's completion of the
        # rollback (it retires the version again while it is being redeployed): leave that to the operator.
        raise RuntimeError(
            f"rollout {rollouts['active']} is still running; end it (recsys canary rollback --reason ...) first"
        )
    status, body = api(settings, "POST", "/api/rollouts", {"version": version, "policy": policy})
    if status != 201:
        raise RuntimeError(f"could not start the canary (version {version}): {status} {body}")
    return body["id"]


def ledger(settings: Settings, rollout_id: int) -> list[str]:
    _, body = api(settings, "GET", f"/api/decisions?rollout_id={rollout_id}&limit=1000")
    return [
        f"{d['action']} → canary {d['canary_weight']}%"
        for d in reversed(body["decisions"])
        if d["action"] not in ("hold", "no_data")
    ]


def logged_predictions(settings: Settings, since: float, until: float) -> int:
    from sqlalchemy import func, select

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(predictions)
                .where(
                    predictions.c.ts >= since,
                    predictions.c.ts <= until,
                    predictions.c.status < 300,
                    predictions.c.route == "weighted",
                )
            ).scalar_one()
    finally:
        engine.dispose()


# --- the soak ----------------------------------------------------------------------------------------
def run_locust(
    settings: Settings, users: int, think_s: float, duration_s: float, csv_prefix: Path, log_path: Path
) -> subprocess.Popen:
    return start_locust(
        settings,
        users,
        log_path,
        *("-t", f"{int(duration_s)}s", "--stop-timeout", "5"),
        *("--csv", str(csv_prefix), "--json-file", str(csv_prefix)),
        *("--think-min", str(think_s), "--think-max", str(think_s)),
        *("--label-delay-min", "0.2", "--label-delay-max", "2.0"),
    )


def read_locust(csv_prefix: Path, result: Result) -> None:
    """Counts and percentiles from the JSON Locust writes after its users stopped (its CSV can be a beat early)."""
    with open(f"{csv_prefix}.json") as f:
        entries = json.load(f)
    times: dict[float, int] = {}
    for e in entries:
        result.requests += e["num_requests"]
        result.failures += e["num_failures"]
        if e["name"] in ("/predict", "/recommend"):
            result.predictions_ok += e["num_requests"] - e["num_failures"]
        for ms, n in e["response_times"].items():
            times[float(ms)] = times.get(float(ms), 0) + n
        result.rps = result.requests / max(1.0, result.wall_s)
    ordered, seen, total = sorted(times.items()), 0, sum(times.values())
    marks = {0.5: None, 0.95: None, 0.99: None}
    for ms, n in ordered:
        seen += n
        for q in marks:
            if marks[q] is None and seen >= q * total:
                marks[q] = ms
    result.p50_ms, result.p95_ms, result.p99_ms = (marks[q] or 0.0 for q in (0.5, 0.95, 0.99))
    failures = Path(f"{csv_prefix}_failures.csv")
    if failures.exists():
        with open(failures) as f:
            result.failure_examples = [
                f"{r['Method']} {r['Name']}: {r['Error']} ×{r['Occurrences']}" for r in csv.DictReader(f)
            ][:10]


def soak(
    settings: Settings,
    *,
    duration_s: float = 300,
    users: int = 12,
    think_s: float = 0.5,
    warmup_s: float = 20,
    settle_s: float = 5,
    sample_every_s: float = 10,
    policy: dict | None = None,
    workdir: Path | None = None,
    bounds: Bounds | None = None,
) -> Result:
    """Run the soak against the running stack; returns the figures and which bounds broke.

    Locust runs for the warm-up, the canary's start (it returns once the canary's Bento is ready) and
    then `duration_s` of measured steady state, and is stopped with SIGTERM (it writes its stats then).
    """
    bounds = bounds or Bounds()
    workdir = Path(workdir or settings.log_dir / "soak")
    workdir.mkdir(parents=True, exist_ok=True)
    result = Result(duration_s=duration_s, users=users)
    csv_prefix = workdir / "locust"
    started = time.time()
    limit_s = warmup_s + settle_s + duration_s + 600  # a safety net; SIGTERM ends it
    locust = run_locust(settings, users, think_s, limit_s, csv_prefix, workdir / "locust.log")
    rollout_id = version = None
    try:
        time.sleep(warmup_s)
        if policy is not None and (version := canary_version(settings)) is not None:
            rollout_id = start_canary(settings, version, policy)
        for _ in range(4):  # every control-plane worker has imported what its pages need: not growth
            api(settings, "GET", "/api/versions")
        time.sleep(settle_s)
        with MemorySampler(settings, sample_every_s) as memory:
            time.sleep(duration_s)
            locust.terminate()
            locust.wait(60)
        ended = time.time()
    finally:
        if locust.poll() is None:
            locust.kill()
    result.wall_s = ended - started
    result.rss_mb = memory.samples
    result.restarts = {name: len(pids) - 1 for name, pids in memory.pids.items()}
    read_locust(csv_prefix, result)
    deadline = time.monotonic() + 60  # the prediction log is batched: give it time to land
    while True:
        result.predictions_logged = logged_predictions(settings, started, ended + 30)
        if result.predictions_logged >= result.predictions_ok or time.monotonic() > deadline:
            break
        time.sleep(1)
    if rollout_id is not None:
        result.canary = [f"rollout {rollout_id} of version {version}", *ledger(settings, rollout_id)]
    result.broken = check(result, bounds)
    return result


def check(result: Result, bounds: Bounds) -> list[str]:
    broken = []
    if result.requests == 0:
        broken.append("no requests were made")
    if result.error_rate >= bounds.max_error_rate:
        broken.append(f"error rate {result.error_rate:.3%} ≥ {bounds.max_error_rate:.1%}")
    for name in result.rss_mb:
        growth = result.growth_mb(name)
        if growth > bounds.max_rss_growth_mb:
            broken.append(f"{name} grew by {growth:.0f} MB > {bounds.max_rss_growth_mb:.0f} MB")
        if result.restarts.get(name):
            broken.append(f"{name} was restarted during the soak")
    if result.predictions_logged != result.predictions_ok:
        broken.append(
            f"{result.predictions_ok} successful predictions but {result.predictions_logged} logged rows"
        )
    return broken


def render(result: Result, bounds: Bounds) -> str:
    ok = "✅" if not result.broken else "❌"
    lines = [
        f"### Soak: {result.duration_s / 60:.1f} min measured ({result.wall_s / 60:.1f} min of load), "
        f"{result.users} Locust users through the gateway {ok}",
        "",
        "| figure | value | bound |",
        "|---|---|---|",
        f"| requests (predictions, recommendations, labels) | {result.requests} ({result.rps:.1f}/s) | |",
        f"| failed requests | {result.failures} ({result.error_rate:.3%}) | < {bounds.max_error_rate:.1%} |",
        f"| latency p50 / p95 / p99 | {result.p50_ms:.0f} / {result.p95_ms:.0f} / {result.p99_ms:.0f} ms | |",
        f"| successful predictions / rows logged | {result.predictions_ok} / {result.predictions_logged} | equal |",
        f"| canary | {'; '.join(result.canary) or 'none started'} | |",
        "",
        "| process (with its children) | memory (PSS) first → last, MB | max | growth | bound |",
        "|---|---|---|---|---|",
    ]
    for name, series in sorted(result.rss_mb.items()):
        restarted = " (restarted)" if result.restarts.get(name) else ""
        lines.append(
            f"| {name}{restarted} | {series[0][1]:.0f} → {series[-1][1]:.0f} | "
            f"{max(v for _, v in series):.0f} | {result.growth_mb(name):+.0f} | "
            f"≤ +{bounds.max_rss_growth_mb:.0f} |"
        )
    if result.failure_examples:
        lines += ["", "Failures: " + "; ".join(result.failure_examples)]
    if result.broken:
        lines += ["", "**Bounds broken:** " + "; ".join(result.broken)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=300)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--think-s", type=float, default=0.5, help="seconds each user waits between calls")
    p.add_argument("--warmup-s", type=float, default=20)
    p.add_argument("--max-error-rate", type=float, default=0.001)
    p.add_argument("--max-rss-growth-mb", type=float, default=64)
    p.add_argument("--no-canary", action="store_true", help="do not start a canary during the soak")
    p.add_argument("--out", type=Path, help="write the Markdown table here (default: <logs>/soak/soak.md)")
    args = p.parse_args(argv)
    settings = Settings.from_env()
    if not gateway_answers(settings):
        print("The local stack is not up: starting it (recsys up).", flush=True)
        settings = up(settings)
    bounds = Bounds(args.max_error_rate, args.max_rss_growth_mb)
    result = soak(
        settings,
        duration_s=args.duration_s,
        users=args.users,
        think_s=args.think_s,
        warmup_s=args.warmup_s,
        policy=None if args.no_canary else LONG_POLICY,
        bounds=bounds,
    )
    table = render(result, bounds)
    out = args.out or settings.log_dir / "soak" / "soak.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"(written to {out})")
    return 1 if result.broken else 0


if __name__ == "__main__":
    sys.exit(main())
