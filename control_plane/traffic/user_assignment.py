"""Sticky, monotone assignment of users to versions, done in Traefik by the `userassign` local plugin.

The plugin (Go source beside this module, run by Traefik's Yaegi interpreter, nothing downloaded)
hashes a request's `X-User-Id` onto [0, 10000) and writes the weighted service's sticky cookie into the
request, naming the child its bucket falls in; Traefik's weighted service then sends the request there.
Traefik stays the only splitter: requests without a user id keep the weighted split (and browsers get
the same sticky cookie in the response, so they stay on one version too).

The arms are laid out in `ARM_ORDER`: control, baseline, canary. A canary that gains weight from the
baseline takes buckets from the baseline's end only, so its users never leave it; at weight 0 its
buckets all go back to the baseline; the control's buckets move only when the control's weight does.
This module mirrors the plugin's hash (CRC-32, IEEE) so that tests and analysis can predict a user's arm.
"""

from __future__ import annotations

import hashlib
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLUGIN_ALIAS = "userassign"  # the key under experimental.localPlugins and a middleware's `plugin:`
PLUGIN_MODULE = "recsys/userassign"
PLUGIN_SOURCE = Path(__file__).with_name("userassign")
USER_HEADER = "X-User-Id"
PAIR_HEADER = "X-Recsys-Pair"  # the pair key shared by a request and its shadow copy (bentos/http.py)
STICKY_COOKIE = "recsys_arm"
DEFAULT_SEED = "recsys"
BUCKETS = 10_000
ARM_ORDER = ("control", "baseline", "canary")


@dataclass(frozen=True)
class Arm:
    """One child of the weighted service as the plugin sees it: the role, its cookie value, its weight."""

    role: str
    cookie: str
    weight: int


def sticky_cookie_value(child_service: str) -> str:
    """The value Traefik's weighted service gives the sticky cookie of a child: SHA-256 of its name, 16 hex."""
    return hashlib.sha256(child_service.encode()).hexdigest()[:16]


def bucket(user_id: str, seed: str = DEFAULT_SEED) -> int:
    """The user's place on [0, BUCKETS), as the plugin computes it: CRC-32 (IEEE) of seed + user id."""
    return zlib.crc32(user_id.encode(), zlib.crc32(seed.encode())) % BUCKETS


def upper_bounds(weights: Mapping[str, int]) -> list[tuple[str, int]]:
    """(role, upper bucket bound) in layout order, for the roles with weight; empty if all weigh 0."""
    total = sum(max(0, weights.get(role, 0)) for role in ARM_ORDER)
    bounds: list[tuple[str, int]] = []
    cumulative = 0
    for role in ARM_ORDER:
        weight = weights.get(role, 0)
        if weight <= 0:
            continue
        cumulative += weight
        bounds.append((role, cumulative * BUCKETS // total))
    return bounds


def assigned_role(user_id: str, weights: Mapping[str, int], seed: str = DEFAULT_SEED) -> str | None:
    """The role the plugin sends this user to under these weights (None if every weight is 0)."""
    b = bucket(user_id, seed)
    for role, bound in upper_bounds(weights):
        if b < bound:
            return role
    return None


def plugin_config(
    services: Mapping[str, str], weights: Mapping[str, int], seed: str = DEFAULT_SEED
) -> dict[str, Any]:
    """The middleware's `plugin: {userassign: ...}` block: role -> child service name, and the weights."""
    arms = [
        {"cookie": sticky_cookie_value(services[role]), "weight": int(weights.get(role, 0))}
        for role in ARM_ORDER
        if role in services
    ]
    return {PLUGIN_ALIAS: {"header": USER_HEADER, "cookieName": STICKY_COOKIE, "seed": seed, "arms": arms}}


def pair_plugin_config(header: str = PAIR_HEADER) -> dict[str, Any]:
    """The `plugin:` block of the pair-key middleware: the same plugin in its pair-key mode, which gives
    each request a fresh random key in `header` (replacing a client's) before Traefik's mirror copies it."""
    return {PLUGIN_ALIAS: {"pairHeader": header}}


def install_plugin(workdir: Path | str) -> Path:
    """Copy the plugin's source to `<workdir>/plugins-local/src/<module>`, where a Traefik started in
    `workdir` loads it (Traefik reads local plugins relative to its working directory)."""
    dest = Path(workdir) / "plugins-local" / "src" / PLUGIN_MODULE
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(PLUGIN_SOURCE, dest)
    return dest


def static_plugins() -> dict[str, Any]:
    """The `experimental.localPlugins` entry of Traefik's static configuration."""
    return {PLUGIN_ALIAS: {"moduleName": PLUGIN_MODULE}}
