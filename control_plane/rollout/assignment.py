"""Which version holds each role and its share of the weighted traffic, as a value with the verbs a
rollout needs."""

from __future__ import annotations

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

    @classmethod
    def of(cls, mapping: Mapping[str, tuple[int | None, int]]) -> Assignment:
        """From the traffic store's role -> (version, weight); a role left out holds nothing."""
        return cls(**{r: Slot(*mapping.get(r, (None, 0))) for r in ROLES})

    def as_mapping(self) -> dict[str, tuple[int | None, int]]:
        """The traffic store's role -> (version, weight)."""
        return {r: (self.slot(r).version, self.slot(r).weight) for r in ROLES}

    def slot(self, role: str) -> Slot:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return getattr(self, role)

    @property
    def weights(self) -> dict[str, int]:
        return {r: self.slot(r).weight for r in ROLES}

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
