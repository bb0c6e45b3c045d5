"""Pair keys in the real Traefik: during a shadow phase the `userassign` plugin's pair-key mode gives each
request a fresh X-Recsys-Pair before the mirror copies it, so the baseline and the shadow see the same key."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from control_plane.traffic import Backend, TraefikFileRouter
from control_plane.traffic.base import Mirror
from control_plane.traffic.traefik_file import GatewayOptions
from control_plane.traffic.user_assignment import PAIR_HEADER
from tests.integration._traefik import Backends, configure, running, wait_until

pytestmark = pytest.mark.integration


def _seen(path) -> list[tuple[str, str | None]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_baseline_and_its_shadow_copy_see_the_same_fresh_pair_key(tmp_path):
    traefik = configure(tmp_path, user_plugin=True)
    logs = {role: tmp_path / f"{role}.jsonl" for role in ("baseline", "canary")}  # (path, pair key) seen
    backends = Backends()
    try:
        for role, log in logs.items():
            backends.start(role, record=log)
        router = TraefikFileRouter(traefik.dynamic_dir, options=GatewayOptions(user_assignment=True))
        router.set_backends(
            {
                "baseline": Backend(1, backends.url("baseline")),
                "canary": Backend(2, backends.url("canary")),
            }
        )
        router.set_weights({"baseline": 100, "canary": 0})
        router.set_mirror(Mirror(2, 100))

        def pair_key_enabled() -> bool:  # the middleware is loaded: the plugin interpreted its pair-key mode
            return traefik.enabled("middlewares/recsys-pair-key@file") and traefik.enabled(
                "routers/gateway@file"
            )

        with running(traefik, pair_key_enabled, 30):
            n = 40
            with httpx.Client(base_url=traefik.gateway, timeout=5) as client:
                for i in range(n):
                    # a client's own key is replaced: a caller cannot make two requests one pair
                    headers = {PAIR_HEADER: "forged"} if i % 2 else {}
                    assert (
                        client.post(
                            "/predict" if i % 3 else "/recommend", content=b"{}", headers=headers
                        ).status_code
                        == 200
                    )
            wait_until(
                lambda: len(_seen(logs["canary"])) == n, 10
            )  # the mirror's copies arrive after the answers
            live, copies = _seen(logs["baseline"]), _seen(logs["canary"])
            keys = [k for _, k in live]
            assert len(live) == n and all(k is not None and re.fullmatch(r"[0-9a-f]{32}", k) for k in keys), (
                live
            )
            assert len(set(keys)) == n  # one fresh key per request
            assert {k for _, k in copies} == set(keys)
            assert {(p.removeprefix("/shadow"), k) for p, k in copies} == set(live)  # same request, same key
            assert all(p.startswith("/shadow/") for p, _ in copies)

            # the mirror stopped: no pair-key middleware, no key
            router.set_mirror(None)
            wait_until(
                lambda: traefik.api_get("/api/http/middlewares/recsys-pair-key@file").status_code == 404, 10
            )
            with httpx.Client(base_url=traefik.gateway, timeout=5) as client:
                assert client.post("/predict", content=b"{}").status_code == 200
            assert _seen(logs["baseline"])[-1] == ("/predict", None)
    finally:
        backends.stop_all()
