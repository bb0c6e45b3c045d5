"""Which version holds each role and its share of the weighted traffic, as a value with the verbs a
rollout needs; what the traffic store saves and loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.settings import ROLES


@dataclass(frozen=True)
class Slot:
    """One role: the version holding it (None: nothing) and its weight in percent."""

    version: int | None = None
    weight: int = 0


EMPTY = Slot()


@dataclass(frozen=True)
class Assignment:
    """Baseline, canary and control; the control keeps its share through every rollout step."""

    baseline: Slot = EMPTY
    canary: Slot = EMPTY
    control: Slot = EMPTY

    def slot(self, role: str) -> Slot:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return getattr(self, role)

    @property
    def slots(self) -> dict[str, Slot]:
        """Every role's slot, in the roles' order."""
        return {r: self.slot(r) for r in ROLES}

    @property
    def versions(self) -> dict[str, int | None]:
        return {r: s.version for r, s in self.slots.items()}

    @property
    def weights(self) -> dict[str, int]:
        return {r: s.weight for r, s in self.slots.items()}

    @property
    def empty(self) -> bool:
        """No role holds a version or weight: the traffic store before its first save (a saved
        assignment always has a positive weight)."""
        return self == Assignment()

    def with_slot(self, role: str, slot: Slot) -> Assignment:
        """`slot` in `role`; the other roles unchanged."""
        self.slot(role)  # an unknown role raises KeyError
        return dataclasses.replace(self, **{role: slot})

    def with_weights(self, weights: Mapping[str, int]) -> Assignment:
        """Each role's version at its weight in `weights` (a role left out: 0)."""
        return Assignment(**{r: Slot(s.version, weights.get(r, 0)) for r, s in self.slots.items()})

    @property
    def held(self) -> list[int]:
        """The versions holding a role, each once, in order: what must be running."""
        return sorted({v for v in self.versions.values() if v is not None})

    def holds(self, version: int) -> bool:
        """Whether `version` holds some role."""
        return version in self.held

    def to_json(self) -> dict[str, dict]:
        """Weights and versions per role, as the API shows them; both empty before the first save."""
        if self.empty:
            return {"weights": {}, "versions": {}}
        return {"weights": self.weights, "versions": self.versions}

    @property
    def _control_weight(self) -> int:
        """The control's share, 0 when no version holds the control role."""
        return self.control.weight if self.control.version is not None else 0

    def _rest(self, canary_weight: int) -> int:
        return max(0, 100 - canary_weight - self._control_weight)

    def with_canary(self, weight: int, version: int | None = None) -> Assignment:
        """The canary (`version`, else the one holding the role) at `weight`; the baseline takes the rest."""
        return Assignment(
            baseline=Slot(self.baseline.version, self._rest(weight)),
            canary=Slot(self.canary.version if version is None else version, weight),
            control=Slot(self.control.version, self._control_weight),
        )

    def promoted(self, version: int | None = None) -> Assignment:
        """The canary (`version`, else the one holding the role) becomes the baseline; no canary."""
        return Assignment(
            baseline=Slot(self.canary.version if version is None else version, self._rest(0)),
            canary=EMPTY,
            control=Slot(self.control.version, self._control_weight),
        )

    def without_canary(self) -> Assignment:
        """The canary retired: the baseline takes its share back."""
        return Assignment(
            baseline=Slot(self.baseline.version, self._rest(0)),
            canary=EMPTY,
            control=Slot(self.control.version, self._control_weight),
        )
