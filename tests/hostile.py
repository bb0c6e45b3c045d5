"""Hostile requests against a running stack: how many get a 5xx, hang, or a 2xx that left no row.

Generates a fresh set each run (a seed picks the sizes, ids and byte positions) of these kinds:

  deep        JSON nested from 33 to 100,000 levels, whole or unclosed, as the body and inside fields
  labels      large label bodies that look valid (1,000 labels, ids of 128 characters, near 1 MB), and
              ones just past a limit (1,001 labels, 129 characters, over 1 MB)
  text        lone surrogates and NULs, escaped and raw, in ids, keys, policy names, item ids, headers
  ints        ids and versions at and past integer limits (2**31, 2**63, 10**30, 5,000 digits)
  chunked     a chunked body whose chunk-size line is malformed
  slow        headers or bodies that stall or trickle and never finish
  control     ordinary requests, which must be served and logged

and sends them with raw sockets (so that malformed framing reaches the server as written) to the
gateway, the control plane and a Bento directly. A request is a *hang* when no answer and no close
came within 10 s of the client's last byte. Every 2xx from /predict or /recommend must have its row in
`predictions` (by the X-Request-ID it answered with), every 2xx from /feedback its rows in `labels`.
The traffic split and the rollouts are read before and after: hostile requests must change neither.

    python -m tests.hostile      # in the environment `recsys up` ran with (ports, state directory)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

HANG_S = 10.0
FEATURES = [round(0.1 * i, 1) for i in range(1, 17)]
KINDS = ("deep", "labels", "text", "ints", "chunked", "slow", "control")
INT_LIMITS = (2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30)


@dataclass(frozen=True)
class Target:
    """Where the stack answers: the gateway, the control plane, one Bento; the operator's token."""

    gateway: str  # host:port
    control_plane: str
    bento: str
    token: str
    label_token: str = ""  # /feedback's own credential: without it every label probe stops at the 401
    # The key the Bentos sign request ids with: labels that must be stored name ids signed with it (the
    # control plane refuses a label for an id the stack did not issue); empty, the ids are unsigned.
    request_id_key: str = ""

    def label_id(self, rng: random.Random, client_chars: int = 0) -> str:
        """A request id as a Bento issues it (32 fresh hex digits, signed), after `client_chars`
        characters of a client's own id: 0 gives 57 characters, 70 the longest id, 128."""
        fresh = f"{rng.getrandbits(128):032x}"
        client = f"{rng.getrandbits(512):x}".rjust(client_chars, "0")[:client_chars] if client_chars else None
        if not self.request_id_key:
            return f"{client}.{fresh}" if client else fresh
        from control_plane.request_ids import RequestIdSigner

        return RequestIdSigner.from_secret(self.request_id_key).issue(fresh, client)


@dataclass(frozen=True)
class Probe:
    """One hostile request: bytes sent in parts, `pause_s` apart, then the client waits (never closes)."""

    kind: str
    name: str
    to: str  # "gateway", "control_plane" or "bento"
    parts: tuple[bytes, ...]
    pause_s: float = 0.0
    label_ids: tuple[str, ...] = ()  # request ids a 2xx must have stored in `labels`
    logs_prediction: bool = False  # a 2xx must have stored its row in `predictions`


@dataclass(frozen=True)
class Answer:
    probe: Probe
    status: int | None  # None: the server closed without answering, or never answered
    closed: bool  # the server closed the connection (with or without an answer)
    waited_s: float  # from the client's last byte to the answer or the close
    request_id: str
    body: bytes = b""

    @property
    def hang(self) -> bool:
        return self.status is None and not self.closed


@dataclass
class Report:
    sent: int = 0
    by_status: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    hang_targets: Counter = field(default_factory=Counter)  # gateway, control_plane, bento
    ok_without_row: list[str] = field(default_factory=list)
    max_wait_s: float = 0.0
    state_changed: bool = False

    def summary(self) -> dict:
        return {
            "sent": self.sent,
            "5xx": len(self.server_errors),
            "hangs_over_10s": len(self.hangs),
            "hangs_by_target": dict(self.hang_targets),
            "2xx_without_row": len(self.ok_without_row),
            "state_changed": self.state_changed,
            "max_wait_s": round(self.max_wait_s, 2),
            "by_status": dict(sorted(self.by_status.items(), key=lambda kv: str(kv[0]))),
            "failures": (self.server_errors + self.hangs + self.ok_without_row)[:30],
        }


# --- building requests -------------------------------------------------------------------------
def P(kind: str, name: str, to: str, raw: bytes, **kw) -> Probe:
    """A probe sent in one piece."""
    return Probe(kind, name, to, (raw,), **kw)


def http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: recsys", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body and "Transfer-Encoding" not in (headers or {}):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _nested(depth: int, closed: bool, inner: str = "1") -> str:
    return "[" * depth + inner + ("]" * depth if closed else "")


def _auth(target: Target) -> dict[str, str]:
    return {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}


JSON = {"Content-Type": "application/json"}


def deep(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    for depth in (33, 1000, 5000, 100_000, rng.randrange(40, 200_000)):
        closed = rng.random() < 0.5
        n = _nested(depth, closed)
        bodies = {
            "feedback": [n, '{"labels": ' + n + "}", '{"request_id": ' + n + ', "label": 1}'],
            "api": ['{"weights": {"baseline": ' + n + "}}", '{"version": 3, "policy": {"steps": ' + n + "}}"],
            "model": [n, '{"features": ' + n + "}", '{"candidates": ' + n + "}"],
        }
        for to in ("gateway", "control_plane"):
            for b in bodies["feedback"]:
                out.append(
                    P(
                        "deep",
                        f"/feedback {to} depth {depth}",
                        to,
                        http("POST", "/feedback", b.encode(), JSON),
                    )
                )
        for b in bodies["api"]:
            path, method = ("/api/traffic", "PUT") if "weights" in b else ("/api/rollouts", "POST")
            out.append(
                P("deep", f"{path} depth {depth}", "control_plane", http(method, path, b.encode(), _auth(t)))
            )
        for to in ("gateway", "bento"):
            for b in bodies["model"]:
                path = "/recommend" if "candidates" in b else "/predict"
                out.append(P("deep", f"{path} {to} depth {depth}", to, http("POST", path, b.encode(), JSON)))
    return out


def labels(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    for to in ("gateway", "control_plane"):
        ids = tuple(t.label_id(rng) for _ in range(1000))
        items = [{"request_id": i, "label": rng.randrange(2)} for i in ids]
        out.append(
            P("labels", f"1000 labels {to}", to, http("POST", "/feedback", _json(items), JSON), label_ids=ids)
        )
        long_ids = tuple(t.label_id(rng, client_chars=70) for _ in range(1000))  # 128 characters
        body = _json({"labels": [{"request_id": i, "label": 1} for i in long_ids]})
        padded = body[:-1] + b" " * (990_000 - len(body)) + b"}"  # near the 1 MB limit, still valid
        out.append(
            P(
                "labels",
                f"1000 128-char labels near 1 MB {to}",
                to,
                http("POST", "/feedback", padded, JSON),
                label_ids=long_ids,
            )
        )
        out.append(
            P("labels", f"1001 labels {to}", to, http("POST", "/feedback", _json(items + items[:1]), JSON))
        )
        out.append(
            P(
                "labels",
                f"129-char id {to}",
                to,
                http("POST", "/feedback", _json({"request_id": "a" * 129, "label": 1}), JSON),
            )
        )
        out.append(
            P(
                "labels",
                f"over 1 MB {to}",
                to,
                http("POST", "/feedback", b"[" + b" " * 1_000_100 + b"]", JSON),
            )
        )
        dup = [{"request_id": ids[0], "label": 0}, {"request_id": ids[0], "label": 1}]
        out.append(
            P(
                "labels",
                f"one id twice {to}",
                to,
                http("POST", "/feedback", _json(dup), JSON),
                label_ids=ids[:1],
            )
        )
    return out


UNSTORABLE = ("\\ud800", "\\udfff", "a\\u0000b", "\\u0000", "\\udbff\\u0041")


def text(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    raw_surrogate = b"\xed\xa0\x80"
    for to in ("gateway", "control_plane"):
        for s in UNSTORABLE:
            rid = f"{rng.getrandbits(32):08x}{s}"
            for body in (
                f'{{"request_id": "{rid}", "label": 1}}',
                f'[{{"request_id": "{rng.getrandbits(32):08x}", "label": 1}}, {{"request_id": "{rid}", "label": 0}}]',
                f'{{"labels": [{{"request_id": "x", "label": 1, "{s}": 2}}]}}',
            ):
                out.append(
                    P("text", f"/feedback {to} {s}", to, http("POST", "/feedback", body.encode(), JSON))
                )
        raw = b'{"request_id": "' + raw_surrogate + b'", "label": 1}'
        out.append(P("text", f"/feedback {to} raw surrogate", to, http("POST", "/feedback", raw, JSON)))
    for s in UNSTORABLE:
        out.append(
            P(
                "text",
                f"policy name {s}",
                "control_plane",
                http(
                    "POST",
                    "/api/rollouts",
                    f'{{"version": 3, "policy": {{"name": "{s}"}}}}'.encode(),
                    _auth(t),
                ),
            )
        )
        out.append(
            P(
                "text",
                f"weights key {s}",
                "control_plane",
                http(
                    "PUT", "/api/traffic", f'{{"weights": {{"{s}": 5, "baseline": 95}}}}'.encode(), _auth(t)
                ),
            )
        )
        for to in ("gateway", "bento"):
            cand = f'{{"candidates": [{{"item_id": "{s}", "features": {json.dumps(FEATURES)}}}], "k": 1}}'
            out.append(
                P(
                    "text",
                    f"/recommend item_id {s} {to}",
                    to,
                    http("POST", "/recommend", cand.encode(), JSON),
                    logs_prediction=True,
                )
            )
    for to in ("gateway", "bento"):
        for bad in (b"a\x00b", b"\xed\xa0\x80", b"\xff" * 4, b"x" * 200):
            head = (
                b"POST /predict HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\nX-Request-ID: "
                + bad
            )
            body = _json({"features": FEATURES})
            req = head + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            out.append(P("text", f"/predict X-Request-ID {bad[:8]!r} {to}", to, req, logs_prediction=True))
    return out


def ints(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    for vs in [*map(str, INT_LIMITS), str(rng.randrange(2**31, 2**70)), "9" * 5000]:
        out.append(P("ints", f"GET rollout {vs[:12]}", "control_plane", http("GET", f"/api/rollouts/{vs}")))
        for action in ("pause", "resume", "promote", "rollback", "evaluate"):
            out.append(
                P(
                    "ints",
                    f"{action} rollout {vs[:12]}",
                    "control_plane",
                    http("POST", f"/api/rollouts/{vs}/{action}", b"", _auth(t)),
                )
            )
        for body in (f'{{"version": {vs}}}', f'{{"weights": {{"baseline": {vs}, "control": 5}}}}'):
            path, method = ("/api/rollouts", "POST") if "version" in body else ("/api/traffic", "PUT")
            out.append(
                P("ints", f"{path} {vs[:12]}", "control_plane", http(method, path, body.encode(), _auth(t)))
            )
        out.append(
            P(
                "ints",
                f"decisions rollout_id {vs[:12]}",
                "control_plane",
                http("GET", f"/api/decisions?rollout_id={vs}"),
            )
        )
        for to in ("gateway", "control_plane"):
            out.append(
                P(
                    "ints",
                    f"/feedback label {vs[:12]} {to}",
                    to,
                    http("POST", "/feedback", f'{{"request_id": "x", "label": {vs}}}'.encode(), JSON),
                )
            )
        for to in ("gateway", "bento"):
            cand = f'{{"candidates": [{{"item_id": "a", "features": {json.dumps(FEATURES)}}}], "k": {vs}}}'
            out.append(
                P("ints", f"/recommend k {vs[:12]} {to}", to, http("POST", "/recommend", cand.encode(), JSON))
            )
    return out


def chunked(rng: random.Random, t: Target) -> list[Probe]:
    body = _json({"features": FEATURES})
    sizes = [b"zz", b"-1", b"f" * 20, b"0x10", b" ", b"", f"{len(body):x};".encode() + b"e" * 5000, b"1" * 3]
    sizes.append(bytes(rng.randrange(33, 127) for _ in range(rng.randrange(1, 12))))
    out = []
    for to in ("gateway", "bento"):
        for size in sizes:
            head = b"POST /predict HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            out.append(
                P(
                    "chunked",
                    f"/predict chunk-size {size[:10]!r} {to}",
                    to,
                    head + size + b"\r\n" + body + b"\r\n0\r\n\r\n",
                    logs_prediction=True,
                )
            )
        head = b"POST /predict HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        out.append(
            P(
                "chunked",
                f"/predict chunk longer than said {to}",
                to,
                head + b"3\r\n" + body + b"\r\n0\r\n\r\n",
                logs_prediction=True,
            )
        )
    for to in ("gateway", "control_plane"):
        head = b"POST /feedback HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        out.append(P("chunked", f"/feedback chunk-size zz {to}", to, head + b"zz\r\n{}\r\n0\r\n\r\n"))
    return out


def slow(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    body = _json({"features": FEATURES})
    for to, path, payload in (
        ("gateway", "/predict", body),
        ("gateway", "/feedback", _json({"request_id": "slow", "label": 1})),
        ("control_plane", "/feedback", _json({"request_id": "slow", "label": 1})),
        ("bento", "/predict", body),
    ):
        full = http("POST", path, payload, JSON)
        cut = full.index(b"\r\n\r\n")
        stall_at = rng.randrange(10, cut)
        out.append(P("slow", f"{path} headers stall {to}", to, full[:stall_at]))
        trickle = tuple(full[i : i + 1] for i in range(rng.randrange(20, 40)))
        out.append(Probe("slow", f"{path} headers trickle {to}", to, trickle, pause_s=0.3))
        out.append(P("slow", f"{path} body stall {to}", to, full[: cut + 4 + len(payload) // 2]))
    return out


def control(rng: random.Random, t: Target) -> list[Probe]:
    out = []
    for _ in range(5):
        out.append(
            P(
                "control",
                "/predict gateway",
                "gateway",
                http("POST", "/predict", _json({"features": FEATURES}), JSON),
                logs_prediction=True,
            )
        )
        rid = t.label_id(rng)
        out.append(
            P(
                "control",
                "/feedback gateway",
                "gateway",
                http("POST", "/feedback", _json({"request_id": rid, "label": 1}), JSON),
                label_ids=(rid,),
            )
        )
    return out


GENERATORS = {
    "deep": deep,
    "labels": labels,
    "text": text,
    "ints": ints,
    "chunked": chunked,
    "slow": slow,
    "control": control,
}


def generate(seed: int, target: Target, kinds=KINDS, per_kind: int | None = None) -> list[Probe]:
    """The probes of `kinds`, or a random `per_kind` of each, in a random order."""
    rng = random.Random(seed)
    probes = []
    for kind in kinds:
        made = GENERATORS[kind](rng, target)
        probes += rng.sample(made, min(per_kind, len(made))) if per_kind else made
    rng.shuffle(probes)
    return probes


# --- sending -----------------------------------------------------------------------------------
def with_label_token(parts: tuple[bytes, ...], label_token: str) -> tuple[bytes, ...]:
    """The request's parts with /feedback's credential after its request line, so that a hostile body
    reaches the parser instead of stopping at the 401 (a request that names one keeps its own)."""
    first = parts[0] if parts else b""
    if not label_token or not first.startswith(b"POST /feedback ") or b"\r\nAuthorization:" in first:
        return parts
    line, sep, rest = first.partition(b"\r\n")
    return (line + sep + f"Authorization: Bearer {label_token}\r\n".encode() + rest, *parts[1:])


def send(probe: Probe, target: Target) -> Answer:
    host, port = getattr(target, probe.to).rsplit(":", 1)
    parts = with_label_token(probe.parts, target.label_token)
    status, closed, data = None, False, b""
    with socket.create_connection((host, int(port)), timeout=HANG_S) as s:
        try:
            for i, part in enumerate(parts):
                if i and probe.pause_s:
                    time.sleep(probe.pause_s)
                s.sendall(part)
        except OSError:
            closed = True  # the server closed while the client was still sending (413, 408 ...)
        last_byte = time.monotonic()
        while not closed:
            left = HANG_S - (time.monotonic() - last_byte)
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
        waited = time.monotonic() - last_byte
    if data.startswith(b"HTTP/"):
        try:
            status = int(data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = None
        closed = True  # an answer came: not a hang even if the server kept the socket open
    head, _, payload = data.partition(b"\r\n\r\n")
    rid = ""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-request-id":
            rid = value.strip().decode("latin-1")
    return Answer(probe, status, closed, waited, rid, payload[:300])


# --- checking ----------------------------------------------------------------------------------
def missing_rows(answers: list[Answer], database_url: str, wait_s: float = 15.0) -> list[str]:
    """The 2xx answers whose rows are not in the database after `wait_s` (rows arrive ~1 s late)."""
    from sqlalchemy import create_engine, text

    want_pred = {a.request_id: a for a in answers if _ok(a) and a.probe.logs_prediction}
    want_label = {rid: a for a in answers if _ok(a) for rid in a.probe.label_ids}
    engine = create_engine(database_url)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            with engine.connect() as conn:
                have_pred = _present(conn, text, "predictions", list(want_pred))
                have_label = _present(conn, text, "labels", list(want_label))
            missing = [a for rid, a in want_pred.items() if rid not in have_pred]
            missing += [a for rid, a in want_label.items() if rid not in have_label]
            if not missing or time.monotonic() > deadline:
                return [f"{a.probe.kind}: {a.probe.name} -> {a.status}, no row" for a in missing]
            time.sleep(1)
    finally:
        engine.dispose()


def _present(conn, text, table: str, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        params = {f"p{j}": v for j, v in enumerate(part)}
        sql = f"SELECT request_id FROM {table} WHERE request_id IN ({', '.join(':' + k for k in params)})"
        found |= {r[0] for r in conn.execute(text(sql), params)}
    return found


def _ok(a: Answer) -> bool:
    return a.status is not None and 200 <= a.status < 300


def stack_state(target: Target) -> tuple:
    """The traffic split and the rollouts, as the API shows them."""
    import urllib.request

    out = []
    for path in ("/api/traffic", "/api/rollouts"):
        with urllib.request.urlopen(f"http://{target.control_plane}{path}", timeout=10) as resp:
            out.append(json.loads(resp.read()))
    return tuple(json.dumps(o, sort_keys=True) for o in out)


def run(probes: list[Probe], target: Target, database_url: str, workers: int = 8) -> Report:
    before = stack_state(target)
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda p: send(p, target), probes))
    report = Report(sent=len(answers))
    for a in answers:
        report.by_status[a.status if a.status is not None else "closed" if a.closed else "hang"] += 1
        report.max_wait_s = max(report.max_wait_s, a.waited_s)
        where = f"{a.probe.kind}: {a.probe.name}"
        if a.status is not None and a.status >= 500:
            report.server_errors.append(f"{where} -> {a.status} {a.body[:120]!r}")
        if a.hang:
            report.hangs.append(f"{where} -> no answer in {HANG_S:g} s")
            report.hang_targets[a.probe.to] += 1
    report.ok_without_row = missing_rows(answers, database_url)
    report.state_changed = stack_state(target) != before
    return report


def target_from_env(env: dict[str, str]) -> tuple[Target, str]:
    """The stack's ports, token and database, from the environment `recsys up` ran with."""
    from control_plane.settings import Settings

    s = Settings.from_env(env)
    baseline = s.bento_base_port + _baseline_version(s)
    token = s.api_token or (s.state_dir / "api-token").read_text().strip()
    label_token = s.label_token or (s.state_dir / "label-token").read_text().strip()
    key_file = s.state_dir / "request-id-key"
    request_id_key = s.request_id_key or (key_file.read_text().strip() if key_file.exists() else "")
    host = s.bind_host
    return (
        Target(
            f"{host}:{s.gateway_port}",
            f"{host}:{s.control_plane_port}",
            f"{host}:{baseline}",
            token,
            label_token,
            request_id_key,
        ),
        s.database_url,
    )


def _baseline_version(settings) -> int:
    import urllib.request

    with urllib.request.urlopen(
        f"http://{settings.bind_host}:{settings.control_plane_port}/api/traffic", timeout=10
    ) as resp:
        return int(json.loads(resp.read())["versions"]["baseline"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--per-kind", type=int, default=None, help="a random subset of each kind")
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    target, database_url = target_from_env(dict(os.environ))
    probes = generate(seed, target, args.kinds.split(","), args.per_kind)
    started = time.monotonic()
    report = run(probes, target, database_url, args.workers)
    print(
        json.dumps(
            {"seed": seed, "seconds": round(time.monotonic() - started, 1), **report.summary()}, indent=1
        )
    )
    return (
        0
        if not (report.server_errors or report.hangs or report.ok_without_row or report.state_changed)
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
