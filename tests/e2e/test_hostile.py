"""Hostile requests against the running stack: no 5xx, no hang, no 2xx without its row, nothing changed.

A bounded subset of tests/hostile.py (every kind; the benchmark sends about 290), requests that stall
or trickle at every server (the gateway, a Bento and the control plane reached directly), and slow
clients against the control plane while labels go through the gateway.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import hostile, slow_clients

pytestmark = pytest.mark.e2e

SEED = 25


def test_hostile_requests_get_no_5xx_no_hang_and_no_2xx_without_its_row(stack):
    target, database_url = hostile.target_from_env(stack.env)
    probes = hostile.generate(SEED, target, per_kind=14)
    assert {p.kind for p in probes} == set(hostile.KINDS)
    report = hostile.run(probes, target, database_url)
    summary = report.summary()
    assert report.server_errors == [], summary
    assert report.hangs == [], summary
    assert report.ok_without_row == [], summary
    assert not report.state_changed, summary
    assert summary["by_status"].get(200, 0) >= 5  # the ordinary requests among them were served


def test_stalled_requests_through_the_gateway_are_closed_within_its_read_timeout(stack):
    target, _ = hostile.target_from_env(stack.env)
    read_timeout_s = stack.settings().gateway_read_timeout_s
    probes = [p for p in hostile.slow(random.Random(SEED), target) if p.to == "gateway"]
    with ThreadPoolExecutor(len(probes)) as pool:
        answers = list(pool.map(lambda p: hostile.send(p, target), probes))
    for probe, answer in zip(probes, answers, strict=True):
        assert answer.closed and (answer.status is None or 400 <= answer.status < 500), (probe.name, answer)
        assert answer.waited_s < read_timeout_s + 2, (probe.name, answer.waited_s)


@pytest.mark.parametrize("to", ["bento", "control_plane"])
def test_requests_that_stall_at_a_bento_or_the_control_plane_directly_get_408_and_a_close(stack, to):
    """uvicorn had no deadline for headers (bentos/header_deadline.py adds one), and waitress closed a
    stalled request only after 120 s of silence, a trickled one never (control_plane/web/server.py)."""
    target, _ = hostile.target_from_env(stack.env)
    probes = [p for p in hostile.slow(random.Random(SEED), target) if p.to == to]
    assert {p.name.split()[1] for p in probes} == {"headers", "body"}
    with ThreadPoolExecutor(len(probes)) as pool:
        answers = list(pool.map(lambda p: hostile.send(p, target), probes))
    for probe, answer in zip(probes, answers, strict=True):
        assert not answer.hang, (probe.name, answer)
        if "stall" in probe.name:  # the client waits for the answer: it must be the 408, with its reason
            assert answer.status == 408, (probe.name, answer)
            assert b"within 5 s" in answer.body, (probe.name, answer.body)
        else:  # a trickler still sending when the server gives up sees the close (its 408 may be lost)
            assert answer.closed and answer.status in (None, 408), (probe.name, answer)


def test_twelve_trickling_connections_do_not_freeze_the_control_plane_nor_labels_through_the_gateway(stack):
    target, _ = hostile.target_from_env(stack.env)
    for probe_target, probe in (
        (target.gateway, "POST:/feedback"),
        (target.control_plane, "GET:/healthz"),
    ):
        setup = slow_clients.Setup(
            target=target.control_plane,
            probe_target=probe_target,
            probe=probe,
            body='{"request_id": "trickle-probe", "label": 1}' if "feedback" in probe else "",
            tricklers=12,
            probes=5,
        )
        result = slow_clients.run(setup)
        assert result.frozen == 0 and result.answered == 5, result
