"""Moving traffic: persist the assignment, then make the router match it."""

from __future__ import annotations

from collections.abc import Mapping

from control_plane.settings import ROLES
from control_plane.traffic.base import Backend, validate_weights

Assignment = dict[str, tuple[int | None, int]]  # role -> (version, weight)


def split(canary_weight: int, control_weight: int, has_canary: bool, has_control: bool) -> dict[str, int]:
    """Weights for a canary at `canary_weight`: control keeps its share, the baseline takes the rest."""
    canary = canary_weight if has_canary else 0
    control = control_weight if has_control else 0
    return {"baseline": max(0, 100 - canary - control), "canary": canary, "control": control}


def apply_assignment(ctx, assignment: Mapping[str, tuple[int | None, int]]) -> None:
    """Persist `assignment` in traffic_config, then rewrite the router to match in one atomic write."""
    full = {role: assignment.get(role, (None, 0)) for role in ROLES}
    for role, (version, weight) in full.items():
        if version is None and weight:
            raise ValueError(f"role {role!r} has weight {weight} but no version")
    weights = validate_weights({r: w for r, (_, w) in full.items()})
    endpoints = ctx.deployer.endpoints()
    backends: dict[str, Backend | None] = {}
    for role, (version, _) in full.items():
        if version is None:
            backends[role] = None
        elif version in endpoints:
            backends[role] = Backend(version=version, url=endpoints[version])
        else:
            raise ValueError(f"version {version} (role {role}) is not deployed")
    ctx.traffic_store.save(full)
    ctx.router.apply(backends, weights)  # one atomic write: backends and weights change together


def sync_router(ctx) -> None:
    """Make Traefik match what traffic_config says (after a restart or a crash)."""
    apply_assignment(ctx, ctx.traffic_store.load())
