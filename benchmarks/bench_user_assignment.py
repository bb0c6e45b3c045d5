"""What sticky user assignment costs the gateway: Traefik's CPU per request with and without the plugin.

One Traefik, configured as `recsys up` configures it (fast proxy, access log of problems, one Go
processor on a small machine, the plugin loaded), in front of three backends with the 85/10/5 split.
Each round rewrites its dynamic configuration between the variants (without user assignment; with the
`userassign` plugin and the sticky cookie), waits for the reload, and wrk sends the same /predict
bodies with an `X-User-Id` drawn from 10,000 ids (and, with the plugin, without one too). Traefik's
CPU (user + system, from /proc) over the requests wrk counted is its CPU per request; the variants
alternate within each round, and the medians of the per-round ratios are compared. One process for
all variants: two Traefiks measured side by side differed by up to 15 % with the same configuration.
Two more variants measure the shadow phase's pair key: a mirror of 10 % of the requests to the canary's
backend with the plugin's pair-key middleware on the routers (as the control plane writes it) and the
same file without it; their ratio is the pair key's own cost.

    PYTHONPATH=. python benchmarks/bench_user_assignment.py --rounds 5 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from control_plane.stack.programs import traefik_env
from control_plane.traffic import Backend, TraefikFileRouter, render_static_config
from control_plane.traffic.base import Mirror
from control_plane.traffic.traefik_file import PAIR_KEY_MIDDLEWARE, GatewayOptions
from control_plane.traffic.user_assignment import install_plugin

TRAEFIK = Path(sys.executable).with_name("traefik")
VERSIONS = {"baseline": 1, "canary": 2, "control": 0}
SPLIT = {"baseline": 85, "canary": 10, "control": 5}
BODY = json.dumps({"features": [0.1] * 16})

BACKEND = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b'{"score": 0.5}'

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    do_GET = do_POST = answer

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

LUA = """
counter = 0
request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if USERS then headers["X-User-Id"] = "user-" .. (counter % 10000) end
  return wrk.format("POST", "/predict", headers, BODY)
end
"""


@dataclass(frozen=True)
class Sample:
    variant: str
    requests: int
    seconds: float
    traefik_cpu_s: float

    @property
    def us_per_request(self) -> float:
        return self.traefik_cpu_s / max(self.requests, 1) * 1e6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Variant:
    name: str
    plugin: bool
    users: bool
    mirror: bool = False  # a shadow phase: MIRROR_PERCENT of the requests copied to the canary's version
    pair_key: bool = True  # with the mirror and the plugin: the pair-key middleware on the routers


MIRROR_PERCENT = 10
VARIANTS = (
    Variant("no plugin, user ids", plugin=False, users=True),
    Variant("plugin, user ids", plugin=True, users=True),
    Variant("plugin, no user ids", plugin=True, users=False),
    # the shadow phase's pair key (X-Recsys-Pair, the plugin's pair-key mode), with and without it
    Variant("shadow, pair key", plugin=True, users=True, mirror=True),
    Variant("shadow, no pair key", plugin=True, users=True, mirror=True, pair_key=False),
)


def _router(root: Path, urls: dict[str, str], variant: Variant) -> TraefikFileRouter:
    """Write the dynamic configuration of `variant`."""
    router = TraefikFileRouter(root / "dynamic", options=GatewayOptions(user_assignment=variant.plugin))
    router.apply({role: Backend(VERSIONS[role], urls[role]) for role in VERSIONS}, SPLIT)
    router.set_mirror(Mirror(VERSIONS["canary"], MIRROR_PERCENT) if variant.mirror else None)
    if variant.mirror and not variant.pair_key:  # the same file without the pair-key middleware
        config = yaml.safe_load(router.path.read_text())
        for r in config["http"]["routers"].values():
            r["middlewares"] = [m for m in r.get("middlewares", []) if m != PAIR_KEY_MIDDLEWARE]
        del config["http"]["middlewares"][PAIR_KEY_MIDDLEWARE]
        tmp = root / f"{router.path.name}.tmp"  # outside the watched directory, then renamed into it
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, router.path)
    return router


def _start_traefik(root: Path, urls: dict[str, str]) -> tuple[subprocess.Popen, str]:
    root.mkdir(parents=True)
    install_plugin(root)
    port = _free_port()
    (root / "traefik.yml").write_text(
        render_static_config(
            dynamic_dir=root / "dynamic",
            gateway_port=port,
            api_port=_free_port(),
            log_level="WARN",
            user_plugin=True,
        )
    )
    _router(root, urls, VARIANTS[1])
    log = open(root / "traefik.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [str(TRAEFIK), f"--configFile={root / 'traefik.yml'}"],
        cwd=root,
        env={**os.environ, **traefik_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/predict", content=BODY, headers={"X-User-Id": "u1"}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"Traefik at {url} never answered; see {root / 'traefik.log'}")


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _wrk(url: str, script: Path, duration_s: int, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"(\d+) requests in", out)
    if not match:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return int(match.group(1))


def run(rounds: int, duration_s: int, connections: int, workdir: Path) -> list[Sample]:
    backends = []
    urls = {}
    for role in VERSIONS:
        port = _free_port()
        backends.append(
            subprocess.Popen([sys.executable, "-c", BACKEND, str(port)], stderr=subprocess.DEVNULL)
        )
        urls[role] = f"http://127.0.0.1:{port}"
    procs = []
    try:
        root = workdir / "traefik"
        proc, url = _start_traefik(root, urls)
        procs.append(proc)
        scripts = {}
        for users in (True, False):  # the same bodies, with or without ids
            scripts[users] = workdir / f"{'users' if users else 'anonymous'}.lua"
            scripts[users].write_text(f"USERS = {'true' if users else 'false'}\nBODY = '{BODY}'\n{LUA}")
        samples = []
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                _router(root, urls, variant)
                time.sleep(2.0)  # past the providers throttle and the reload
                _wrk(
                    url, scripts[variant.users], 1, connections
                )  # warm up (new connections, Yaegi's first calls)
                cpu0, t0 = _cpu(proc.pid), time.perf_counter()
                n = _wrk(url, scripts[variant.users], duration_s, connections)
                samples.append(Sample(variant.name, n, time.perf_counter() - t0, _cpu(proc.pid) - cpu0))
        return samples
    finally:
        for p in procs + backends:
            p.terminate()
            p.wait(10)


def report(samples: list[Sample]) -> dict:
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.variant, []).append(s)
    base = by["no plugin, user ids"]
    out = {
        name: {
            "traefik_us_per_request_median": statistics.median(s.us_per_request for s in group),
            "requests_per_s_median": statistics.median(s.requests / s.seconds for s in group),
            # each round's ratio to the same round's no-plugin run, then the median of those
            "cpu_vs_no_plugin": statistics.median(
                s.us_per_request / b.us_per_request for s, b in zip(group, base, strict=True)
            ),
            "rounds": len(group),
        }
        for name, group in by.items()
    }
    if "shadow, pair key" in by:  # the pair key's own cost, against the same round's mirror without it
        with_key, without = by["shadow, pair key"], by["shadow, no pair key"]
        out["shadow, pair key"]["cpu_vs_shadow_without_pair_key"] = statistics.median(
            a.us_per_request / b.us_per_request for a, b in zip(with_key, without, strict=True)
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk per variant and round")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--out", type=Path, default=None, help="also write the samples and summary as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-users-") as tmp:
        samples = run(args.rounds, args.duration, args.connections, Path(tmp))
    summary = report(samples)
    for name, row in summary.items():
        print(
            f"{name:22s} Traefik {row['traefik_us_per_request_median']:6.1f} us/request "
            f"(x{row['cpu_vs_no_plugin']:.3f})  {row['requests_per_s_median']:7.0f} requests/s"
            + (
                f"  pair key x{row['cpu_vs_shadow_without_pair_key']:.3f} of the shadow phase without it"
                if "cpu_vs_shadow_without_pair_key" in row
                else ""
            )
        )
    if args.out:
        args.out.write_text(
            json.dumps({"samples": [asdict(s) for s in samples], "summary": summary}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
