"""Slow clients against one HTTP server: do they freeze it for everyone else?

Opens `--tricklers` connections that send a request's headers one byte every `--byte-every-s` and never
finish, then, while they trickle, sends ordinary requests one after another and times each (an answer
slower than `--timeout-s`, or none, counts as frozen). Prints one JSON line with the medians and counts.

    python -m tests.slow_clients --target 127.0.0.1:8090 --tricklers 12 --probe GET:/healthz
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass

TRICKLE = b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n"


@dataclass(frozen=True)
class Setup:
    """Who trickles where, and what the probes ask meanwhile."""

    target: str  # host:port the tricklers connect to
    probe_target: str | None = None  # host:port the probes go to (default: target)
    probe: str = "GET:/healthz"  # METHOD:PATH
    body: str = ""
    tricklers: int = 12
    byte_every_s: float = 1.0
    settle_s: float = 3.0
    probes: int = 20
    timeout_s: float = 10.0
    label: str = ""


@dataclass(frozen=True)
class Result:
    server: str
    tricklers: int
    probes: int
    answered: int
    frozen: int
    median_ms: float | None
    max_ms: float | None
    tricklers_closed_by_server: int
    median_trickler_life_s: float | None


def trickle(host: str, port: int, every_s: float, stop: threading.Event, lives: list, closed: list) -> None:
    """Send TRICKLE a byte at a time, over and over, until told to stop or the server closes."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            i = 0
            while not stop.is_set():
                s.sendall(TRICKLE[i % len(TRICKLE) : i % len(TRICKLE) + 1])
                i += 1
                if stop.wait(every_s):
                    break
                s.setblocking(False)
                try:
                    if s.recv(1024) == b"":
                        closed.append(1)
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
    except OSError:
        closed.append(1)
    lives.append(time.monotonic() - started)


def probe(host: str, port: int, method: str, path: str, body: bytes, timeout_s: float) -> float | None:
    """Seconds to a complete status line, or None if none came within `timeout_s`."""
    started = time.monotonic()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(head + body)
            data = b""
            while b"\r\n" not in data:
                s.settimeout(max(0.01, timeout_s - (time.monotonic() - started)))
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    return time.monotonic() - started


def run(args: Setup) -> Result:
    host, port = args.target.rsplit(":", 1)
    port = int(port)
    ph, pp = (args.probe_target or args.target).rsplit(":", 1)
    method, path = args.probe.split(":", 1)
    body = args.body.encode()
    stop, lives, closed = threading.Event(), [], []
    threads = [
        threading.Thread(
            target=trickle, args=(host, port, args.byte_every_s, stop, lives, closed), daemon=True
        )
        for _ in range(args.tricklers)
    ]
    for t in threads:
        t.start()
    time.sleep(args.settle_s)
    times = [probe(ph, int(pp), method, path, body, args.timeout_s) for _ in range(args.probes)]
    stop.set()
    for t in threads:
        t.join(timeout=10)
    answered = [t for t in times if t is not None and t <= args.timeout_s]
    return Result(
        server=args.label,
        tricklers=args.tricklers,
        probes=len(times),
        answered=len(answered),
        frozen=len(times) - len(answered),
        median_ms=round(statistics.median(answered) * 1000, 1) if answered else None,
        max_ms=round(max(answered) * 1000, 1) if answered else None,
        tricklers_closed_by_server=len(closed),
        median_trickler_life_s=round(statistics.median(lives), 1) if lives else None,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port the tricklers connect to")
    p.add_argument("--probe-target", help="host:port the probes go to (default: --target)")
    p.add_argument("--probe", default="GET:/healthz", help="METHOD:PATH of each probe")
    p.add_argument("--body", default="", help="the probes' body")
    p.add_argument("--tricklers", type=int, default=12)
    p.add_argument("--byte-every-s", type=float, default=1.0)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--label", default="")
    print(json.dumps(asdict(run(Setup(**vars(p.parse_args(argv)))))))


if __name__ == "__main__":
    main()
