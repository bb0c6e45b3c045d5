"""Paired differences on identical requests: the shadow's answer against the baseline's, request by request.

During a shadow phase the gateway gives each request a pair key before Traefik's mirror copies it
(control_plane/traffic/user_assignment.py: the plugin's pair-key mode), and both Bentos log it
(predictions.pair_key). Joined on it, every pair is one request answered by both versions, so each
difference is free of the request-to-request variation that the split test has to average away:
score drift, top-k overlap of /recommend lists, latency and errors, and, once the baseline's
request has a closed label, whether each version was right. The per-pair accuracy difference is
tested with the normal-mixture confidence sequence of analysis/sequential.py on the pairs' own
variance: always valid, so it can be read at every evaluation, and far tighter than the unpaired
test when the two versions mostly agree (the variance of a difference of correlated outcomes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from control_plane.analysis import sequential as seq

CORRECT_THRESHOLD = 0.5  # a prediction is right when (score >= 0.5) == its outcome (as label_facts)


@dataclass(frozen=True)
class Pair:
    """One request answered by both: the shadow's copy and the baseline's live answer."""

    shadow_score: float | None
    baseline_score: float | None
    shadow_latency_ms: float
    baseline_latency_ms: float
    shadow_status: int
    baseline_status: int
    shadow_served: tuple[str, ...] | None = None  # /recommend: the top k each would serve
    baseline_served: tuple[str, ...] | None = None
    outcome: int | None = None  # the baseline request's outcome once its window closed; None: open


@dataclass(frozen=True)
class Moments:
    """n, sum and sum of squares of a per-pair difference: what its mean, variance and test need."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        values = np.asarray(values, dtype=float)
        return cls(int(values.size), float(values.sum()), float((values * values).sum()))

    def merge(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.squares + other.squares)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The per-pair sample variance (n - 1 in the denominator); None below two pairs."""
        if self.n < 2:
            return None
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True)
class PairedFacts:
    """Additive sums over a set of pairs (mergeable across evaluations or buckets)."""

    pairs: int = 0
    score_diff: Moments = Moments()  # shadow score minus baseline score, where both scored
    score_abs_diff: float = 0.0  # sum of |shadow - baseline| over the same pairs
    latency_diff: Moments = Moments()  # shadow minus baseline latency, ms
    shadow_slower: int = 0  # pairs where the shadow took longer
    both_errors: int = 0  # status >= 500 for both answers
    shadow_only_errors: int = 0
    baseline_only_errors: int = 0
    ranked: int = 0  # /recommend pairs where both served a list
    overlap_sum: float = 0.0  # sum over them of |shadow's top k ∩ baseline's| / k
    correct_diff: Moments = Moments()  # shadow right minus baseline right (-1, 0, 1), labelled pairs

    def merge(self, other: PairedFacts) -> PairedFacts:
        return PairedFacts(
            self.pairs + other.pairs,
            self.score_diff.merge(other.score_diff),
            self.score_abs_diff + other.score_abs_diff,
            self.latency_diff.merge(other.latency_diff),
            self.shadow_slower + other.shadow_slower,
            self.both_errors + other.both_errors,
            self.shadow_only_errors + other.shadow_only_errors,
            self.baseline_only_errors + other.baseline_only_errors,
            self.ranked + other.ranked,
            self.overlap_sum + other.overlap_sum,
            self.correct_diff.merge(other.correct_diff),
        )


@dataclass(frozen=True, order=True)
class PairKey:
    """What paired sums are kept per (the pair_buckets tables): the bucket of the shadow copy's time
    and the two versions that answered."""

    start: int
    shadow_version: int
    baseline_version: int


@dataclass(frozen=True)
class CorrectCounts:
    """The accuracy difference of labelled pairs as counts: each pair's difference is -1, 0 or 1, so
    its n, sum and sum of squares are the labelled pairs and those only one version got right."""

    labelled: int = 0
    shadow_only_right: int = 0
    baseline_only_right: int = 0

    @classmethod
    def of(cls, m: Moments) -> CorrectCounts:
        return cls(m.n, round((m.squares + m.total) / 2), round((m.squares - m.total) / 2))

    @property
    def moments(self) -> Moments:
        s, b = self.shadow_only_right, self.baseline_only_right
        return Moments(self.labelled, float(s - b), float(s + b))


def paired_facts_by_key(keyed: Iterable[tuple[PairKey, Pair]]) -> dict[PairKey, PairedFacts]:
    """The sums of each key's pairs (what the pair job adds per bucket)."""
    groups: dict[PairKey, list[Pair]] = {}
    for key, p in keyed:
        groups.setdefault(key, []).append(p)
    return {key: paired_facts(ps) for key, ps in groups.items()}


def top_k_overlap(shadow: Iterable[str], baseline: Iterable[str]) -> float:
    """|shadow ∩ baseline| / k, k the longer list's length: 1 when both serve the same items."""
    s, b = list(shadow), list(baseline)
    k = max(len(s), len(b))
    return len(set(s) & set(b)) / k if k else 1.0


def _right(score: float, outcome: int) -> int:
    return int((score >= CORRECT_THRESHOLD) == bool(outcome))


def paired_facts(pairs: Iterable[Pair]) -> PairedFacts:
    """The sums of these pairs. A pair with an error on either side has no score difference and no
    correctness difference (an error answers nothing); its errors are counted."""
    pairs = list(pairs)
    if not pairs:
        return PairedFacts()
    s_err = np.array([p.shadow_status >= 500 for p in pairs])
    b_err = np.array([p.baseline_status >= 500 for p in pairs])
    scored = [p for p in pairs if p.shadow_score is not None and p.baseline_score is not None]
    diffs = np.array([p.shadow_score - p.baseline_score for p in scored], dtype=float)
    lat = np.array([p.shadow_latency_ms - p.baseline_latency_ms for p in pairs], dtype=float)
    ranked = [p for p in scored if p.shadow_served is not None and p.baseline_served is not None]
    labelled = [p for p in scored if p.outcome is not None]
    correct = np.array(
        [_right(p.shadow_score, p.outcome) - _right(p.baseline_score, p.outcome) for p in labelled],
        dtype=float,
    )
    return PairedFacts(
        pairs=len(pairs),
        score_diff=Moments.of(diffs),
        score_abs_diff=float(np.abs(diffs).sum()),
        latency_diff=Moments.of(lat),
        shadow_slower=int((lat > 0).sum()),
        both_errors=int((s_err & b_err).sum()),
        shadow_only_errors=int((s_err & ~b_err).sum()),
        baseline_only_errors=int((~s_err & b_err).sum()),
        ranked=len(ranked),
        overlap_sum=float(sum(top_k_overlap(p.shadow_served, p.baseline_served) for p in ranked)),
        correct_diff=Moments.of(correct),
    )


@dataclass(frozen=True)
class PairedTest:
    """An always-valid test of a per-pair mean difference against 0, and its confidence sequence."""

    n: int
    mean: float | None
    lower: float | None  # the (1 - alpha) confidence sequence at this look
    upper: float | None
    p: float | None  # always-valid two-sided p-value of "no difference" (min(1, 1/likelihood ratio))
    alpha: float

    @property
    def decided(self) -> bool:
        """The sequence excludes 0: the difference is there, with the sign of `mean`."""
        return self.lower is not None and (self.lower > 0 or self.upper < 0)


def paired_test(m: Moments, alpha: float, expected_n: float, min_pairs: int = 2) -> PairedTest:
    """Mixture-SPRT on the mean of per-pair differences (Johari et al. 2017), variance from the pairs.

    The mixture is tuned to decide at `expected_n` pairs. With fewer than `min_pairs`, or no variance
    at all (every pair agrees), there is nothing to test yet; all fields but n are then None."""
    var1 = m.variance
    if m.n < max(2, min_pairs) or var1 is None or var1 <= 0:
        return PairedTest(m.n, m.mean, None, None, None, alpha)
    var = var1 / m.n
    tau2 = seq.mixing_variance(var1, expected_n, alpha)
    lo, hi = seq.confidence_sequence(m.mean, var, tau2, alpha)
    p = seq.always_valid_p(seq.mixture_lr(m.mean, var, tau2))
    return PairedTest(m.n, m.mean, float(lo), float(hi), float(p), alpha)


def unpaired_test(
    shadow: Moments, baseline: Moments, alpha: float, expected_n: float, min_n: int = 2
) -> PairedTest:
    """The same mixture-SPRT on the difference of two independent means (what the split test sees):
    for comparing the paired test's power with it on the same data."""
    vs, vb = shadow.variance, baseline.variance
    if min(shadow.n, baseline.n) < max(2, min_n) or vs is None or vb is None or vs + vb <= 0:
        return PairedTest(min(shadow.n, baseline.n), None, None, None, None, alpha)
    diff = shadow.mean - baseline.mean
    var = vs / shadow.n + vb / baseline.n
    tau2 = seq.mixing_variance(vs + vb, expected_n, alpha)
    lo, hi = seq.confidence_sequence(diff, var, tau2, alpha)
    p = seq.always_valid_p(seq.mixture_lr(diff, var, tau2))
    return PairedTest(min(shadow.n, baseline.n), diff, float(lo), float(hi), float(p), alpha)


def summary(facts: PairedFacts, alpha: float, expected_n: float) -> dict:
    """The paired numbers a person reads (the shadow decision's evidence, the ledger and the API)."""
    sd, ld, cd = facts.score_diff, facts.latency_diff, facts.correct_diff
    test = paired_test(cd, alpha, expected_n)
    return {
        "pairs": facts.pairs,
        "score": {
            "n": sd.n,
            "mean_diff": _num(sd.mean),
            "sd_diff": _num(None if sd.variance is None else math.sqrt(sd.variance)),
            "mean_abs_diff": _num(facts.score_abs_diff / sd.n if sd.n else None),
        },
        "latency_ms": {
            "n": ld.n,
            "mean_diff": _num(ld.mean),
            "sd_diff": _num(None if ld.variance is None else math.sqrt(ld.variance)),
            "shadow_slower": facts.shadow_slower,
        },
        "errors": {
            "both": facts.both_errors,
            "shadow_only": facts.shadow_only_errors,
            "baseline_only": facts.baseline_only_errors,
        },
        "top_k_overlap": {
            "n": facts.ranked,
            "mean": _num(facts.overlap_sum / facts.ranked if facts.ranked else None),
        },
        "accuracy": {
            **{k: _num(v) if isinstance(v, float) else v for k, v in asdict(test).items()},
            "decided": test.decided,
            "expected_n": expected_n,
        },
    }


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
