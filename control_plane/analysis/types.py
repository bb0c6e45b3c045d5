"""The decision seam's plain types: what is observed, what the rollout is, what is decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from control_plane.analysis.aggregates import LatencyHistogram, SparseCounts
from control_plane.analysis.paired import PairedFacts
from control_plane.analysis.user_level import UserEvidence


class Phase(StrEnum):
    """A rollout's phase; the terminal ones never change again."""

    PENDING = "pending"  # created, canary not yet deployed or given weight
    SHADOW = "shadow"  # candidate deployed at weight 0; Traefik mirrors a share of requests to it
    PROGRESSING = "progressing"  # canary serving at a step's weight, evaluated every tick
    PAUSED = "paused"  # an operator froze it: ticks record but do not act
    PROMOTED = "promoted"  # terminal: the canary became the baseline
    ROLLED_BACK = "rolled_back"  # terminal: the canary was harmful or worse, weight 0
    HALTED = "halted"  # terminal: the experiment is broken (sample-ratio mismatch); nothing promoted
    INCONCLUSIVE = "inconclusive"  # terminal: the time limit passed without a decision

    @property
    def terminal(self) -> bool:
        return self in {Phase.PROMOTED, Phase.ROLLED_BACK, Phase.HALTED, Phase.INCONCLUSIVE}


# The candidate's weight right after a promotion: it *is* the baseline then, carrying all of the
# baseline's traffic, until the control plane restores the split.
PROMOTED_WEIGHT = 100


class Action(StrEnum):
    """What one evaluation asks the control plane to do."""

    PROMOTE = "promote"  # canary becomes baseline, default split restored
    ADVANCE = "advance"  # move the canary to the next step's weight
    HOLD = "hold"  # keep collecting
    ROLLBACK = "rollback"  # canary weight to 0 at once
    HALT = "halt"  # stop the experiment (SRM), canary weight to 0, never promote
    INCONCLUSIVE = "inconclusive"  # time limit reached, canary weight to 0
    NO_DATA = "no_data"  # metrics could not be read; nothing decided

    @property
    def code(self) -> int:
        """This action as the rules' arrays hold it (policy.evaluate, the simulations); NO_DATA has none."""
        return _CODES[self]

    @classmethod
    def of_code(cls, code: int) -> Action:
        return _BY_CODE[code]


# The rules decide many rollouts at once in numpy arrays, where an action is its index here.
_BY_CODE = (Action.HOLD, Action.ADVANCE, Action.PROMOTE, Action.ROLLBACK, Action.HALT, Action.INCONCLUSIVE)
_CODES = {a: i for i, a in enumerate(_BY_CODE)}


@dataclass(frozen=True)
class PeriodCounts:
    """One arm's numbers within one period of constant weights (a ramp step)."""

    requests: int
    labelled: int
    correct: float  # a count for accuracy; a ranking metric's sum (analysis/ranking.py: on_metric)
    # /recommend exposures whose window closed in the period, and their clicks' positions (ranking.py)
    ranked: int = 0
    click_positions: SparseCounts = field(default_factory=SparseCounts)
    # of `requests`, those after the step's weights were surely in force (the sample-ratio check's);
    # None: the same as `requests`
    steady_requests: int | None = None

    @property
    def srm_requests(self) -> int:
        return self.requests if self.steady_requests is None else self.steady_requests


@dataclass(frozen=True)
class ArmObservation:
    """One role's numbers over the evaluation window (weighted traffic only, overrides left out)."""

    version: int | None
    requests: int  # all weighted requests in the window
    errors: int  # of those, status >= 500
    latency: LatencyHistogram  # the window's latencies, each quantile within 1 % (aggregates.py)
    labelled: int  # served predictions whose attribution window has closed (positive or negative)
    correct: float  # of those, (score >= 0.5) == outcome (a ranking metric's sum: ranking.on_metric)
    log_loss: float | None = None
    auc: float | None = None  # binned: within auc_max_error of the exact AUC
    auc_max_error: float | None = None
    step_requests: int = 0  # weighted requests since the current step began (for the SRM check)
    # score bins (aggregates.SCORE_BINS) of the labelled predictions: the score distribution, for drift
    scores: SparseCounts = field(default_factory=SparseCounts)
    # per period of constant weights (Observations.periods), in order; empty: not read per period
    periods: tuple[PeriodCounts, ...] = ()
    # /recommend exposures whose attribution window closed, and their clicks' positions as served
    # (counts per 1-based position): every ranking metric comes from these (analysis/ranking.py)
    ranked: int = 0
    click_positions: SparseCounts = field(default_factory=SparseCounts)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class Observations:
    """All arms at one evaluation; `arms` is keyed by role (baseline, canary, control)."""

    now: float
    window_start: float
    window_end: float  # where requests stop being counted: now less the log's settling
    arms: dict[str, ArmObservation]
    step_weights: dict[str, int]  # the weights in force since the current step began
    # Per-arm users when requests name them (analysis/user_level.py); None: no user-level numbers
    users: UserEvidence | None = None
    # the periods of constant weights since the window began: (start, weights then), oldest first
    periods: tuple[tuple[float, dict[str, int]], ...] = ()
    # requests per role as the router counted them over the window; None: not known
    assigned: dict[str, int] | None = None
    # Shadow phase: the shadow's copies joined with the baseline's answers to the same requests
    # (analysis/paired.py); None: not a shadow phase, or a source that cannot pair rows
    pairs: PairedFacts | None = None


@dataclass(frozen=True)
class RolloutState:
    """What the decision needs to know of the rollout, not how it is stored."""

    phase: Phase
    step_index: int
    canary_weight: int
    started_at: float
    step_started_at: float
    evaluations: int = 0  # evaluations so far in this rollout
    # running always-valid p-values from the previous decision's stats["running_p_values"] (empty: none yet)
    running_p_values: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleOutcome:
    """One rule checked at one evaluation: what it compared and whether it held."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool | None  # None: not enough data to judge
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation, with every number behind it."""

    action: Action
    reason: str
    next_weight: int  # the canary weight after acting
    rules: tuple[RuleOutcome, ...] = ()
    stats: dict = field(default_factory=dict)  # estimates, intervals, p-values, sample sizes
