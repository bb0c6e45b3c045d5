"""Replica floors that follow the canary's share: the arithmetic, table-driven."""

from __future__ import annotations

import pytest

from control_plane.traffic.base import Backend
from control_plane.traffic.replica_floors import (
    FloorPlan,
    fleet_replicas,
    floor_for,
    plan_floors,
    shares_by_version,
)

MIN, MAX = 2, 10


@pytest.mark.parametrize(
    "ready, shares, fleet",
    [
        pytest.param({2: 8, 1: 2}, {2: 95, 1: 5}, 9, id="eight baseline replicas at 95 % mean nine for all"),
        pytest.param({2: 8, 3: 2, 1: 2}, {2: 85, 3: 10, 1: 5}, 10, id="read off the busiest version"),
        pytest.param({2: 2}, {2: 100}, 2, id="one version takes everything"),
        pytest.param({2: 0}, {2: 100}, 0, id="nothing ready yet"),
        pytest.param({}, {2: 0}, 0, id="no version holds weight"),
        pytest.param({2: 5, 3: 5}, {2: 50, 3: 50}, 10, id="a tie is read off the lower version"),
    ],
)
def test_the_fleet_is_the_busiest_versions_replicas_scaled_to_all_traffic(ready, shares, fleet):
    assert fleet_replicas(ready, shares) == fleet


@pytest.mark.parametrize(
    "share, fleet, floor",
    [
        pytest.param(10, 10, 2, id="a small share is held at the minimum"),
        pytest.param(25, 10, 3, id="rounded up: 2.5 replicas need 3"),
        pytest.param(50, 10, 5, id="half the fleet"),
        pytest.param(95, 10, 10, id="9.5 rounded up"),
        pytest.param(100, 40, 10, id="never above the maximum"),
        pytest.param(0, 10, 2, id="no share keeps the minimum"),
    ],
)
def test_a_floor_is_the_share_of_the_fleet_within_the_bounds(share, fleet, floor):
    assert floor_for(share, fleet, MIN, MAX) == floor


def test_shares_are_per_version_whatever_role_holds_it():
    backends = {"baseline": Backend(3, "http://x"), "control": Backend(1, "http://y")}
    assert shares_by_version(backends, {"baseline": 95, "canary": 0, "control": 5}) == {3: 95, 1: 5}


# fmt: off
@pytest.mark.parametrize(
    "before, after, fleet, canary, plan",
    [
        pytest.param(
            {2: 95, 1: 5}, {2: 85, 3: 10, 1: 5}, 9, (False, True),
            FloorPlan(raise_first={2: 8}, lower_after={}),
            id="a canary starting at 10 % pins the baseline at its share; the canary stays at the minimum",
        ),
        pytest.param(
            {2: 85, 3: 10, 1: 5}, {2: 70, 3: 25, 1: 5}, 10, (True, True),
            FloorPlan(raise_first={3: 3}, lower_after={2: 7}),
            id="advancing to 25 % raises the canary first and lowers the baseline after",
        ),
        pytest.param(
            {2: 70, 3: 25, 1: 5}, {2: 45, 3: 50, 1: 5}, 10, (True, True),
            FloorPlan(raise_first={3: 5}, lower_after={2: 5}),
            id="advancing to 50 %",
        ),
        pytest.param(
            {2: 45, 3: 50, 1: 5}, {3: 95, 1: 5}, 10, (True, False),
            FloorPlan(raise_first={3: 10}, lower_after={2: 2, 3: 2}),
            id="a promotion scales the new baseline to its whole share before it takes it, then frees every floor",
        ),
        pytest.param(
            {2: 70, 3: 25, 1: 5}, {2: 95, 1: 5}, 10, (True, False),
            FloorPlan(raise_first={2: 10}, lower_after={2: 2, 3: 2}),
            id="a rollback gives the canary's share back to a baseline raised first",
        ),
        pytest.param(
            {2: 95, 1: 5}, {2: 90, 1: 10}, 10, (False, False),
            FloorPlan(raise_first={2: 9}, lower_after={2: 2}),
            id="without a canary a weight change only waits for what the new split needs",
        ),
        pytest.param(
            {2: 85, 3: 10, 1: 5}, {2: 85, 3: 10, 1: 5}, 10, (True, True),
            FloorPlan(raise_first={}, lower_after={}),
            id="the same split changes nothing",
        ),
        pytest.param(
            {2: 85, 3: 10, 1: 5}, {2: 0, 3: 95, 1: 5}, 20, (True, True),
            FloorPlan(raise_first={3: 10}, lower_after={2: 2}),
            id="floors stay within the maximum",
        ),
    ],
)
# fmt: on
def test_floors_are_raised_before_a_share_grows_and_lowered_after_it_shrinks(before, after, fleet, canary, plan):
    canary_before, canary_after = canary
    got = plan_floors(
        before, after, fleet, MIN, MAX, canary_before=canary_before, canary_after=canary_after
    )
    assert got == plan
