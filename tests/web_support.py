"""Builders shared by the web tests: a Context over in-memory fakes, seeded traffic and predictions."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from sqlalchemy import Engine, insert

from control_plane import queries
from control_plane.context import Context
from control_plane.db.schema import labels
from control_plane.deployer.memory import InMemoryDeployer
from control_plane.log_backlog import InMemoryLogBacklog
from control_plane.registry.memory import InMemoryRegistry
from control_plane.request_ids import RequestIdSigner
from control_plane.rollout.assignment import Assignment, Slot
from control_plane.settings import Settings
from control_plane.traffic.memory import InMemoryRouter
from control_plane.traffic_ops import apply_assignment

TOKEN = "test-operator-token-0123456789"
LABEL_TOKEN = "test-label-token-0123456789"
REQUEST_ID_KEY = "test-request-id-key-0123456789"
SIGNER = RequestIdSigner.from_secret(REQUEST_ID_KEY)
LABEL_HEADERS = {"Authorization": f"Bearer {LABEL_TOKEN}"}


def issued_id(client_id: str | None = None) -> str:
    """A request id as a Bento of these settings issues it (signed with REQUEST_ID_KEY)."""
    return SIGNER.issue(uuid.uuid4().hex, client_id)


def make_settings(state_dir: Path, database_url: str = "", **overrides) -> Settings:
    overrides.setdefault("api_token", TOKEN)
    overrides.setdefault("label_token", LABEL_TOKEN)
    overrides.setdefault("request_id_key", REQUEST_ID_KEY)
    return Settings(state_dir=state_dir, database_url=database_url, **overrides)


def make_context(settings: Settings, engine: Engine) -> Context:
    """Versions 1 (baseline, 95%), 2 (control, 5%) and 3 (not deployed, the candidate)."""
    registry = InMemoryRegistry()
    for profile in ("baseline", "control", "better"):
        registry.add_version(profile=profile, metrics={"auc": 0.7})
    deployer = InMemoryDeployer()
    ctx = Context(
        settings,
        engine,
        registry,
        InMemoryRouter(),
        deployer,
        sleep=lambda _s: None,
        drain_s=0,
        log_backlog=InMemoryLogBacklog(),
    )
    deployer.deploy(1)
    deployer.deploy(2)
    registry.set_alias("baseline", 1)
    registry.set_alias("control", 2)
    apply_assignment(ctx, Assignment(baseline=Slot(1, 95), control=Slot(2, 5)))
    return ctx


def seed_predictions(
    engine: Engine,
    versions: dict[str, int],
    *,
    minutes: int = 20,
    per_minute: int = 6,
    users: int = 0,
    recommend: bool = False,
) -> int:
    """Weighted predictions over the last `minutes`, labelled, so charts and window metrics have data.

    With `recommend`, they are /recommend answers serving items a, b, c, and each positive label is a
    click on the item at position i % 3 + 1."""
    now = time.time()
    preds, labs = [], []
    for m in range(minutes):
        for role, version in versions.items():
            for i in range(per_minute):
                rid = f"{role}-{m}-{i}"
                ts = now - (minutes - m) * 60 + i
                score = 0.8 if i % 3 else 0.3
                preds.append(
                    dict(
                        request_id=rid,
                        ts=ts,
                        model_version=version,
                        role=role,
                        route="weighted",
                        endpoint="recommend" if recommend else "predict",
                        features=None,
                        score=score,
                        latency_ms=10.0 + i + version,
                        status=500 if (role == "canary" and i == 0 and m % 4 == 0) else 200,
                        user_key=f"{role}-user-{i % users}" if users else None,
                        served=["a", "b", "c"] if recommend else None,
                    )
                )
                clicked = recommend and i % 2
                labs.append(
                    dict(
                        request_id=rid,
                        label=1 if i % 2 else 0,
                        ts=ts + 1,
                        item_id="abc"[i % 3] if clicked else None,
                        position=i % 3 + 1 if clicked else None,
                    )
                )
    with engine.begin() as conn:
        queries.insert_predictions(conn, preds)
        conn.execute(insert(labels), labs)
    return len(preds)


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


def log_in(client) -> None:
    """Log the test client in through the login form, as a person would."""
    token = csrf_token(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"csrf_token": token, "password": TOKEN})
    assert resp.status_code == 303, resp.get_data(as_text=True)


def snapshot(ctx: Context) -> tuple:
    """Everything a write could change: traffic, rollouts, ledger, registry, router, deployer."""
    return (
        ctx.traffic_store.load(),
        [r.to_dict() for r in ctx.ledger.list(1000)],
        ctx.ledger.decisions(None, 1000),
        [(v.version, v.aliases, v.stage) for v in ctx.registry.versions()],
        ctx.router.get_weights(),
        ctx.router.get_backends(),
        ctx.deployer.endpoints(),
    )
