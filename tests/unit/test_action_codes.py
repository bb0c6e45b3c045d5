"""One action vocabulary: types.Action, and its code in the rules' arrays."""

from __future__ import annotations

import pytest

from control_plane.analysis import policy
from control_plane.analysis.types import Action


def test_an_action_and_its_array_code_are_one_vocabulary():
    decided = [a for a in Action if a is not Action.NO_DATA]
    assert [Action.of_code(a.code) for a in decided] == decided
    assert sorted(a.code for a in decided) == list(range(len(decided)))
    names = ("HOLD", "ADVANCE", "PROMOTE", "ROLLBACK", "HALT", "INCONCLUSIVE")
    assert all(getattr(policy, n) == Action[n].code for n in names)
    with pytest.raises(KeyError):
        Action.NO_DATA.code  # noqa: B018 - the rules never return it
