"""`recsys seed`: the compose stack's one-shot start-up step, run in a container before the control plane.

Trains and registers the starting versions when the registry has none, seeds the weights, deploys each
role's version through the configured deployer (in compose, the DockerDeployer: one image and one
container per version) and writes Traefik's routing. Run again, it changes nothing that is up already.
"""

from __future__ import annotations

import time

from control_plane.context import bootstrap
from control_plane.credentials import ensure_api_token, write_private
from control_plane.settings import Settings
from control_plane.stack.local import ensure_models
from control_plane.traffic.static import ADMIN_FILENAME, render_admin_config
from control_plane.traffic_ops import sync_router


def seed(settings: Settings) -> dict[int, str]:
    """Every role's version deployed and routed; returns version -> URL."""
    t0 = time.monotonic()
    for d in (settings.state_dir, settings.spill_dir, settings.bentoml_home):
        d.mkdir(parents=True, exist_ok=True)
    # Traefik's API and dashboard: a router on its admin entry point behind basic auth (operator, the
    # operator's token), in the shared dynamic directory beside the routing.
    settings.traefik_dynamic_dir.mkdir(parents=True, exist_ok=True)
    write_private(
        settings.traefik_dynamic_dir / ADMIN_FILENAME, render_admin_config(ensure_api_token(settings))
    )
    ctx = bootstrap(settings)
    roles = ensure_models(ctx)
    ctx.traffic_store.seed_if_empty(settings.traffic_weights, roles)
    wanted = ctx.traffic_store.load().held
    print(f"Deploying versions {wanted} ...", flush=True)
    with ctx.action_lock.held("startup by recsys seed"):
        start_many = getattr(ctx.deployer, "start_many", None)  # in parallel where the deployer can
        urls = start_many(wanted) if start_many else {v: ctx.deployer.deploy(v) for v in wanted}
        sync_router(ctx)
    print(
        f"Seeded in {time.monotonic() - t0:.0f} s: " + ", ".join(f"v{v} {u}" for v, u in urls.items()),
        flush=True,
    )
    ctx.engine.dispose()
    return urls
