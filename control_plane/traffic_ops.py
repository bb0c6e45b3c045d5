"""Moving traffic: persist the assignment, then make the router match it."""

from __future__ import annotations

from control_plane.rollout.assignment import Assignment
from control_plane.traffic.base import Backend, validate_weights


def apply_assignment(ctx, assignment: Assignment) -> None:
    """Persist `assignment` in traffic_config, then rewrite the router to match in one atomic write."""
    for role, slot in assignment.slots.items():
        if slot.version is None and slot.weight:
            raise ValueError(f"role {role!r} has weight {slot.weight} but no version")
    weights = validate_weights(assignment.weights)
    endpoints = ctx.deployer.endpoints()
    backends: dict[str, Backend | None] = {}
    for role, version in assignment.versions.items():
        if version is None:
            backends[role] = None
        elif version in endpoints:
            backends[role] = Backend(version=version, url=endpoints[version])
        else:
            raise ValueError(f"version {version} (role {role}) is not deployed")
    ctx.traffic_store.save(assignment)
    ctx.router.apply(backends, weights)  # one atomic write: backends and weights change together


def sync_router(ctx) -> None:
    """Make Traefik match what traffic_config says (after a restart or a crash)."""
    apply_assignment(ctx, ctx.traffic_store.load())
