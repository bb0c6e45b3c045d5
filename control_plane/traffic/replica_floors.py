"""Replica floors that follow the traffic split: pure arithmetic, no I/O (docs/kubernetes.md, "Autoscaling").

An autoscaler sizes each version for the traffic it has seen; a rollout changes that traffic at once.
So before a version's share goes up, its floor (the autoscaler's minimum) is raised to what the new share
needs, and the weights move only once that many replicas are ready; after a share goes down, its floor
is lowered and the autoscaler brings the replicas down at its own pace. Floors follow the split only
while a canary holds weight: once a rollout ends (promoted or rolled back), every floor goes back to the
minimum after the write, so the autoscaler alone sizes the versions again; a promotion still raises the
new baseline to its whole share first.

What "needs" means: the fleet is the replicas the whole traffic needs now, read off the version that
carries the most of it (its autoscaler tracks the load best); a version with share s% needs
ceil(fleet * s / 100) replicas, kept within [min_replicas, max_replicas].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.traffic.base import Backend


@dataclass(frozen=True)
class FloorPlan:
    """Floors to raise (and wait for) before the weights change, and floors to lower after."""

    raise_first: dict[int, int]
    lower_after: dict[int, int]


def shares_by_version(backends: Mapping[str, Backend], weights: Mapping[str, int]) -> dict[int, int]:
    """version -> its percentage of the weighted traffic (0 for a version that holds a role at weight 0)."""
    total = sum(weights.get(role, 0) for role in backends)
    if total <= 0:
        return {b.version: 0 for b in backends.values()}
    return {b.version: 100 * weights.get(role, 0) // total for role, b in backends.items()}


def fleet_replicas(ready: Mapping[int, int], shares: Mapping[int, int]) -> int:
    """Replicas the whole traffic needs: the busiest version's ready replicas scaled up to 100 %."""
    serving = {v: s for v, s in shares.items() if s > 0}
    if not serving:
        return 0
    top = max(sorted(serving), key=lambda v: serving[v])
    return -(-ready.get(top, 0) * 100 // serving[top])


def floor_for(share: int, fleet: int, min_replicas: int, max_replicas: int) -> int:
    """ceil(fleet * share / 100), within [min_replicas, max_replicas]."""
    return max(min_replicas, min(max_replicas, -(-fleet * share // 100)))


def plan_floors(
    before: Mapping[int, int],
    after: Mapping[int, int],
    fleet: int,
    min_replicas: int,
    max_replicas: int,
    *,
    canary_before: bool,
    canary_after: bool,
) -> FloorPlan:
    """Which floors change when the shares go from `before` to `after` (version -> percent), and when.

    `canary_before`/`canary_after`: whether a canary holds weight in each split (the floors follow the
    shares then, and are all at `min_replicas` otherwise). A version new to the split starts at
    `min_replicas` (the deployer creates it there).
    """
    raise_first: dict[int, int] = {}
    lower_after: dict[int, int] = {}
    for version in sorted(set(before) | set(after)):
        needed = floor_for(after.get(version, 0), fleet, min_replicas, max_replicas)
        current = min_replicas
        if canary_before:
            current = floor_for(before.get(version, 0), fleet, min_replicas, max_replicas)
        if needed > current:
            raise_first[version] = current = needed
        final = needed if canary_after else min_replicas
        if final < current:
            lower_after[version] = final
    return FloorPlan(raise_first=raise_first, lower_after=lower_after)
