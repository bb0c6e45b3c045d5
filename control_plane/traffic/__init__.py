"""Traffic between model versions: the TrafficRouter seam, its Traefik and in-memory forms, persisted weights."""

from control_plane.traffic.base import (
    ROLES,
    Backend,
    InvalidBackends,
    InvalidWeights,
    TrafficRouter,
    TrafficStateUnreadable,
    validate_weights,
)
from control_plane.traffic.memory import InMemoryRouter
from control_plane.traffic.static import render_static_config
from control_plane.traffic.store import TrafficStore
from control_plane.traffic.traefik_file import TraefikFileRouter

__all__ = [
    "ROLES",
    "Backend",
    "InMemoryRouter",
    "InvalidBackends",
    "InvalidWeights",
    "TraefikFileRouter",
    "TrafficRouter",
    "TrafficStateUnreadable",
    "TrafficStore",
    "render_static_config",
    "validate_weights",
]
