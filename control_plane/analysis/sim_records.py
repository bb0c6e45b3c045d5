"""The simulation's bucket records: what the prediction log's writer and the label job add per 5 s
bucket, waiting per minute until they come inside the window, then folded by the worker's fold
(analysis/fold.py) into an evaluation's window."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field, fields

import numpy as np

from control_plane.analysis import fold

ROLES = ("baseline", "canary", "control")  # axis 1 of the per-role arrays, as the weights are stacked
ARMS = ("baseline", "canary")  # the roles whose labels and errors count


class _Records:
    """Per-bucket aggregates not yet folded: `starts` (buckets,), every other field (reps, roles, buckets)."""

    starts: np.ndarray

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f.name) for f in fields(self)[1:])

    def __add__(self, other):
        joined = (np.concatenate([a, b], -1) for a, b in zip(self._arrays(), other._arrays(), strict=True))
        return type(self)(np.concatenate([self.starts, other.starts]), *joined)

    def rows(self, k: np.ndarray):
        return type(self)(self.starts, *(a[k] for a in self._arrays()))

    def columns(self, keep: np.ndarray):
        return type(self)(self.starts[keep], *(a[..., keep] for a in self._arrays()))


@dataclass
class RequestRecords(_Records):
    """What the prediction log's writer adds per bucket and role (ROLES), and the router's own count."""

    starts: np.ndarray
    logged: np.ndarray  # requests in the prediction log
    assigned: np.ndarray  # requests the router sent (before any were lost)
    errors: np.ndarray  # of the logged, failed (none counted for the control)

    @classmethod
    def empty(cls, reps: int) -> RequestRecords:
        z = np.zeros((reps, len(ROLES), 0))
        return cls(np.zeros(0), z, z, z)


@dataclass
class LabelRecords(_Records):
    """What the label job adds per bucket and arm (ARMS) once the bucket's attribution windows close."""

    starts: np.ndarray
    labelled: np.ndarray  # served predictions
    correct: np.ndarray  # of those, correct as the label job counts them

    @classmethod
    def empty(cls, reps: int) -> LabelRecords:
        z = np.zeros((reps, len(ARMS), 0))
        return cls(np.zeros(0), z, z)


@dataclass
class Pending:
    """Records waiting to be folded, a minute's at a time, oldest first."""

    empty: _Records  # what `due` gives when nothing is due
    minutes: list = field(default_factory=list)

    def due(self, until: float):
        """The waiting records that may lie inside [0, until), joined (the rest start later)."""
        parts = [m for m in self.minutes if m.starts[0] < until]
        return functools.reduce(operator.add, parts) if parts else self.empty

    def fold_done(self, until: float) -> None:
        """Drop the buckets inside [0, until): they have been folded."""
        kept = [
            m if m.starts[0] >= until else m.columns(~fold.inside(m.starts, 0.0, until)) for m in self.minutes
        ]
        self.minutes = [m for m in kept if len(m.starts)]

    def rows(self, k: np.ndarray) -> None:
        self.empty, self.minutes = self.empty.rows(k), [m.rows(k) for m in self.minutes]


def _pick(sums, k: np.ndarray):
    return type(sums)(*(getattr(sums, f.name)[k] for f in fields(sums)))


@dataclass(frozen=True)
class Window:
    """One evaluation's sums, folded as the worker folds its buckets (analysis/fold.py): requests per role
    (ROLES on axis 1), closed predictions per arm (ARMS on axis 1)."""

    logged: fold.RequestSums
    assigned: np.ndarray  # (reps, roles): requests the router sent in the window's buckets
    labels: fold.LabelSums

    def __add__(self, other: Window) -> Window:
        return Window(self.logged + other.logged, self.assigned + other.assigned, self.labels + other.labels)

    def rows(self, k: np.ndarray) -> Window:
        return Window(_pick(self.logged, k), self.assigned[k], _pick(self.labels, k))


def _per_role(periods: fold.Periods) -> fold.Periods:
    """Each replication's periods, for every role of it (values: reps, roles, buckets)."""
    return fold.Periods(periods.starts[:, None, :], periods.settled[:, None, :])


def fold_requests(records: RequestRecords, periods: fold.Periods, *, until: float) -> tuple:
    """(logged, assigned): the records' requests wholly in [0, until) folded by the worker's fold, and
    the router's counts over the same buckets (totals only)."""
    records = records.columns(records.starts < until)  # the rest cannot be inside yet: not worth folding
    logged = fold.fold_requests(
        records.starts, records.logged, records.errors, since=0.0, until=until, periods=_per_role(periods)
    )
    return logged, fold.totals(records.starts, records.assigned, since=0.0, until=until)


def fold_labels(records: LabelRecords, periods: fold.Periods, *, until: float) -> fold.LabelSums:
    """The records' closed predictions wholly in [0, until), folded by the worker's fold."""
    records = records.columns(records.starts < until)  # the rest cannot be inside yet: not worth folding
    return fold.fold_labels(
        records.starts, records.labelled, records.correct, since=0.0, until=until, periods=_per_role(periods)
    )


@dataclass
class Trace:
    """What a run made and what it folded, for checking it against the worker's path: every minute's
    records, and per evaluation its time, the window folded so far and the periods it was folded with."""

    requests: list[RequestRecords] = field(default_factory=list)
    labels: list[LabelRecords] = field(default_factory=list)
    windows: list[tuple[float, Window, fold.Periods]] = field(default_factory=list)
