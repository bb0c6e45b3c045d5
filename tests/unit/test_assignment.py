"""Assignment: the verbs a rollout moves traffic with."""

from __future__ import annotations

import pytest

from control_plane.rollout.assignment import Assignment, Slot

A = Assignment(Slot(2, 70), Slot(3, 25), Slot(1, 5))


@pytest.mark.parametrize(
    "name, result, expected",
    [
        (
            "the canary at a step, the control keeping its share",
            A.with_canary(50),
            Assignment(Slot(2, 45), Slot(3, 50), Slot(1, 5)),
        ),
        (
            "a new canary version at a step",
            A.with_canary(10, version=4),
            Assignment(Slot(2, 85), Slot(4, 10), Slot(1, 5)),
        ),
        ("the canary promoted to baseline", A.promoted(), Assignment(Slot(3, 95), Slot(), Slot(1, 5))),
        ("the canary retired", A.without_canary(), Assignment(Slot(2, 95), Slot(), Slot(1, 5))),
        (
            "no share for a control without a version",
            Assignment(Slot(2, 90), Slot(), Slot(None, 10)).with_canary(20),
            Assignment(Slot(2, 80), Slot(None, 20), Slot()),
        ),
        (
            "the baseline never below 0",
            Assignment(Slot(2, 0), Slot(3, 0), Slot(1, 60)).with_canary(50),
            Assignment(Slot(2, 0), Slot(3, 50), Slot(1, 60)),
        ),
    ],
)
def test_verbs(name, result, expected):
    assert result == expected


def test_weights_versions_and_an_unknown_role():
    assert A.weights == {"baseline": 70, "canary": 25, "control": 5}
    assert A.versions == {"baseline": 2, "canary": 3, "control": 1}
    assert A.holds(3) and not A.holds(4)
    assert A.held == [1, 2, 3] and Assignment(canary=Slot(4, 10)).held == [4]
    with pytest.raises(KeyError, match="shadow"):
        A.slot("shadow")
    with pytest.raises(KeyError, match="shadow"):
        A.with_slot("shadow", Slot(4, 0))


def test_one_role_replaced_or_every_weight_set():
    assert A.with_slot("canary", Slot(4, 0)) == Assignment(Slot(2, 70), Slot(4, 0), Slot(1, 5))
    assert A.with_weights({"baseline": 90, "control": 10}) == Assignment(Slot(2, 90), Slot(3, 0), Slot(1, 10))


def test_nothing_assigned_shows_no_role():
    assert Assignment().empty and not A.empty
    assert Assignment().to_json() == {"weights": {}, "versions": {}}
    assert Assignment(Slot(2, 100)).to_json() == {
        "weights": {"baseline": 100, "canary": 0, "control": 0},
        "versions": {"baseline": 2, "canary": None, "control": None},
    }
