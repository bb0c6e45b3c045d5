"""Sticky, monotone user assignment by the `userassign` plugin in the real Traefik, three tiny backends."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from control_plane.traffic.traefik_file import GatewayOptions
from control_plane.traffic.user_assignment import STICKY_COOKIE, USER_HEADER, assigned_role
from tests.integration._traefik import ROLE_VERSIONS, configure, role_stack

pytestmark = pytest.mark.integration

SPLIT = {"baseline": 85, "canary": 10, "control": 5}
USERS = [f"user-{i:05d}" for i in range(10_000)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Traefik with the plugin loaded (started in a directory holding plugins-local/), three backends."""
    traefik = configure(tmp_path_factory.mktemp("traefik-users"), user_plugin=True)

    def gateway_enabled() -> bool:  # a plugin that failed to load would disable the gateway router
        return traefik.enabled("routers/gateway@file")

    with role_stack(traefik, GatewayOptions(user_assignment=True), SPLIT, gateway_enabled, 30) as stack:
        yield stack


def _versions(stack, users: list[str], path: str = "/predict") -> dict[str, str]:
    """Each user's backend name, one request per user, four connections at a time."""

    def one(chunk: list[str]) -> dict[str, str]:
        seen = {}
        with httpx.Client(base_url=stack.client.base_url, timeout=5) as client:
            for user in chunk:
                response = client.post(path, headers={USER_HEADER: user}, content=b"{}")
                assert response.status_code == 200, response.text
                seen[user] = response.json()["name"]
        return seen

    chunks = [users[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        out: dict[str, str] = {}
        for part in pool.map(one, chunks):
            out.update(part)
    return out


def _shares(assignment: dict[str, str]) -> dict[str, float]:
    counts = collections.Counter(assignment.values())
    return {role: counts[role] / len(assignment) * 100 for role in ROLE_VERSIONS}


def test_ten_thousand_users_split_within_one_point_of_the_weights(stack):
    stack.set_and_wait(SPLIT)
    assignment = _versions(stack, USERS)
    shares = _shares(assignment)
    for role, weight in SPLIT.items():
        assert abs(shares[role] - weight) <= 1.0, shares
    # The gateway's hash is the one control_plane.traffic.user_assignment predicts.
    assert all(assignment[u] == assigned_role(u, SPLIT) for u in USERS)


def test_a_user_sent_twenty_times_gets_one_version_every_time(stack):
    stack.set_and_wait(SPLIT)
    users = USERS[:500]
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for round_ in range(20):
        path = "/predict" if round_ % 2 else "/recommend"
        for user, name in _versions(stack, users, path).items():
            seen[user].add(name)
    assert all(len(names) == 1 for names in seen.values()), {u: n for u, n in seen.items() if len(n) > 1}
    assert {next(iter(n)) for n in seen.values()} == set(ROLE_VERSIONS)  # all three arms have users


def test_raising_the_canary_moves_users_only_into_it_and_zero_moves_them_all_back(stack):
    stack.set_and_wait(SPLIT)
    before = _versions(stack, USERS)
    stack.set_and_wait({"baseline": 70, "canary": 25, "control": 5})
    after = _versions(stack, USERS)
    moved = {u for u in USERS if before[u] != after[u]}
    assert all(after[u] == "canary" for u in USERS if before[u] == "canary"), "a user left the canary"
    assert moved and all(before[u] == "baseline" and after[u] == "canary" for u in moved)
    assert abs(_shares(after)["canary"] - 25) <= 1.0
    stack.set_and_wait({"baseline": 95, "canary": 0, "control": 5})
    rolled_back = _versions(stack, USERS)
    assert all(rolled_back[u] == "baseline" for u in USERS if after[u] == "canary")
    assert all(rolled_back[u] == after[u] for u in USERS if after[u] != "canary")


def test_requests_without_a_user_keep_the_weighted_split_and_get_a_sticky_cookie(stack):
    stack.set_and_wait(SPLIT)
    counts = collections.Counter()
    for _ in range(2000):
        stack.client.cookies.clear()  # a server-to-server caller: sends no cookie back
        response = stack.client.post("/predict", content=b"{}")
        counts[response.json()["name"]] += 1
    for role, weight in SPLIT.items():
        assert abs(counts[role] / 2000 * 100 - weight) <= 1.5, counts
    with httpx.Client(base_url=stack.client.base_url, timeout=5) as browser:
        first = browser.post("/predict", content=b"{}")
        assert STICKY_COOKIE in first.cookies
        names = {browser.post("/predict", content=b"{}").json()["name"] for _ in range(50)}
        assert names == {first.json()["name"]}


def test_a_user_id_beats_a_stale_cookie_and_header_overrides_beat_both(stack):
    stack.set_and_wait(SPLIT)
    user = next(u for u in USERS if assigned_role(u, SPLIT) == "control")
    with httpx.Client(base_url=stack.client.base_url, timeout=5) as browser:
        while browser.post("/predict", content=b"{}").json()["name"] != "baseline":
            browser.cookies.clear()
        assert STICKY_COOKIE in browser.cookies  # a cookie naming the baseline
        names = {
            browser.post("/predict", headers={USER_HEADER: user}, content=b"{}").json()["name"]
            for _ in range(20)
        }
        assert names == {"control"}
    override = stack.client.post(
        "/predict", headers={USER_HEADER: user, "X-Model-Role": "canary"}, content=b"{}"
    )
    assert override.json() == {"name": "canary", "path": "/predict", "route": "override"}
    by_version = stack.client.post(
        "/predict", headers={USER_HEADER: user, "X-Model-Version": "1"}, content=b"{}"
    )
    assert by_version.json()["name"] == "baseline"
