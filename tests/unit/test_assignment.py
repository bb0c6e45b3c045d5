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


def test_the_stores_mapping_round_trips_and_a_missing_role_holds_nothing():
    assert Assignment.of(A.as_mapping()) == A
    assert Assignment.of({"baseline": (2, 100)}) == Assignment(Slot(2, 100))
    assert Assignment.of({}).as_mapping() == {
        "baseline": (None, 0),
        "canary": (None, 0),
        "control": (None, 0),
    }


def test_weights_and_an_unknown_role():
    assert A.weights == {"baseline": 70, "canary": 25, "control": 5}
    with pytest.raises(KeyError, match="shadow"):
        A.slot("shadow")
