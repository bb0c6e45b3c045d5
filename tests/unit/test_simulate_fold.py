"""The simulation's evidence is what the worker would read: its bucket records, written to a metrics
source and read back by the worker's observation builder, give the same numbers it folded itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from control_plane.analysis.aggregates import BucketKey, LabelFacts, RequestFacts
from control_plane.analysis.policy import Policy
from control_plane.analysis.sim_records import ARMS, ROLES, Trace
from control_plane.analysis.simulate import Scenario, Traffic, run_scenario
from control_plane.metrics_source import MemoryMetricsSource
from control_plane.observations import read_observations

VERSIONS = {"baseline": 1, "canary": 2, "control": 3}
TRAFFIC, POLICY = Traffic(), Policy()


def worker_view(trace: Trace, rep: int, evaluation: int):
    """The worker's observations of one replication at one evaluation, from the records made so far."""
    now, _, periods = trace.windows[evaluation]
    source = MemoryMetricsSource()
    for req, lab in zip(trace.requests[: evaluation + 1], trace.labels[: evaluation + 1], strict=True):
        for b, start in enumerate(req.starts.astype(int).tolist()):
            source.add_requests(
                {
                    BucketKey(start, VERSIONS[role], role, "weighted", "predict"): RequestFacts(
                        int(req.logged[rep, r, b]), int(req.errors[rep, r, b])
                    )
                    for r, role in enumerate(ROLES)
                }
            )
            source.add_labels(
                TRAFFIC.label_window_s,
                {
                    BucketKey(start, VERSIONS[arm], arm, "weighted", "predict"): LabelFacts(
                        closed=int(lab.labelled[rep, a, b]), correct=int(lab.correct[rep, a, b])
                    )
                    for a, arm in enumerate(ARMS)
                },
            )
    begun = [float(s) for s in periods.starts[rep] if math.isfinite(s)]
    weights = [
        {"baseline": 100 - w - TRAFFIC.control_weight, "canary": w, "control": TRAFFIC.control_weight}
        for w in POLICY.steps[: len(begun)]
    ]
    return read_observations(
        source,
        versions=VERSIONS,
        since=0.0,
        step_since=begun[-1],
        now=now,
        label_window_s=TRAFFIC.label_window_s,
        step_weights=weights[-1],
        settle_s=TRAFFIC.settle_s,
        periods=list(zip(begun, weights, strict=True)),
        period_settled=[float(s) for s in periods.settled[rep][: len(begun)]],
    )


@pytest.fixture(scope="module")
def trace() -> Trace:
    trace = Trace()
    # a sample loss and a gain make the arms and the steps differ; 4 replications, traced unmerged
    run_scenario(Scenario("gain, loss", lift=0.03, srm_loss=0.05), POLICY, TRAFFIC, 4, seed=11, trace=trace)
    return trace


def test_the_run_went_through_several_steps(trace):
    steps_begun = [int(np.isfinite(p.starts).sum(axis=1).max()) for _, _, p in trace.windows]
    assert max(steps_begun) >= 2, "the check below must cover more than one period"


@pytest.mark.parametrize("at", [0, 4, 9, 30, -1], ids=lambda i: f"evaluation {i}")
def test_the_simulations_window_equals_the_workers_fold_of_the_same_buckets(trace, at):
    evaluation = at % len(trace.windows)
    _, window, _ = trace.windows[evaluation]
    for rep in range(window.logged.requests.shape[0]):
        obs = worker_view(trace, rep, evaluation)
        begun = len(obs.periods)
        for r, role in enumerate(ROLES):
            arm = obs.arms[role]
            assert (arm.requests, arm.errors) == (
                window.logged.requests[rep, r],
                window.logged.errors[rep, r],
            )
            assert [p.requests for p in arm.periods] == window.logged.period_requests[rep, r, :begun].tolist()
            assert [p.srm_requests for p in arm.periods] == window.logged.period_steady[
                rep, r, :begun
            ].tolist()
            assert not window.logged.period_requests[rep, r, begun:].any()
        for a, role in enumerate(ARMS):
            arm = obs.arms[role]
            labels = window.labels
            assert (arm.labelled, arm.correct) == (labels.labelled[rep, a], labels.correct[rep, a])
            assert [p.labelled for p in arm.periods] == labels.period_labelled[rep, a, :begun].tolist()
            assert [p.correct for p in arm.periods] == labels.period_correct[rep, a, :begun].tolist()
