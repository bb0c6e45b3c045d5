"""Additive summaries of predictions and their labels, per short time bucket: what every read adds up.

Everything here merges by addition, so a window's numbers are the sum of its buckets' whatever wrote
them and in whatever order: the prediction log's writer adds each batch's requests, the label job adds
each closed attribution window's outcomes, a roll-up adds fine buckets into coarse ones. Pure: no I/O.

Latency is a log-spaced histogram with DDSketch's mapping (Masson, Rim & Lee, VLDB 2019): bin i holds
values in (gamma^(i-1), gamma^i] and answers with 2 gamma^i / (gamma + 1), so any quantile it answers
is within RELATIVE_ACCURACY (1 %) of a value of the sample at that rank. Chosen over HDR (which needs a
fixed range and more bins for the same relative error) and over t-digest (whose merge is not exact):
two histograms merge by adding counts, exactly, whatever the order. See docs/scale.md.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

BUCKET_S = 5  # seconds of the prediction's own time per fine bucket: finer than a step's settling
COARSE_BUCKET_S = 3600  # fine buckets older than the fine retention are rolled up into hourly ones

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
MIN_LATENCY_MS = 0.001  # smaller latencies (and 0) share the lowest bin
MAX_LATENCY_MS = 3_600_000.0  # larger share the highest: bins fit an int16

SCORE_BINS = 100  # equal-width score bins for AUC: its error is bounded by auc_max_error()
CORRECT_AT = 0.5  # a score at or above this predicts a click


class SparseCounts:
    """Counts per integer bin; merges by addition. Encoded as n, then n int16 bins and n uint32 counts."""

    __slots__ = ("bins", "counts")

    def __init__(self, bins: np.ndarray | None = None, counts: np.ndarray | None = None):
        self.bins = np.zeros(0, dtype=np.int64) if bins is None else np.asarray(bins, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)

    @classmethod
    def of_bins(cls, bins: np.ndarray) -> SparseCounts:
        b, c = np.unique(np.asarray(bins, dtype=np.int64), return_counts=True)
        return cls(b, c)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def merge(self, other: SparseCounts) -> SparseCounts:
        return SparseCounts.concat([self, other])

    @classmethod
    def concat(cls, parts: list[SparseCounts]) -> SparseCounts:
        """The sum of many at once (one sort, not one per part)."""
        parts = [p for p in parts if len(p.bins)]
        if len(parts) <= 1:
            return parts[0] if parts else cls()
        b, inverse = np.unique(np.concatenate([p.bins for p in parts]), return_inverse=True)
        c = np.bincount(inverse, weights=np.concatenate([p.counts for p in parts]), minlength=len(b))
        return cls(b, c.astype(np.int64))

    def to_bytes(self) -> bytes:
        n = len(self.bins)
        return struct.pack("<I", n) + self.bins.astype("<i2").tobytes() + self.counts.astype("<u4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> SparseCounts:
        if not data:
            return cls()
        (n,) = struct.unpack_from("<I", data)
        bins = np.frombuffer(data, dtype="<i2", count=n, offset=4)
        counts = np.frombuffer(data, dtype="<u4", count=n, offset=4 + 2 * n)
        return cls(bins.astype(np.int64), counts.astype(np.int64))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseCounts) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"SparseCounts({dict(zip(self.bins.tolist(), self.counts.tolist(), strict=True))})"


_MIN_BIN = math.ceil(math.log(MIN_LATENCY_MS) / _LOG_GAMMA)
_MAX_BIN = math.ceil(math.log(MAX_LATENCY_MS) / _LOG_GAMMA)


def latency_bins(values_ms: np.ndarray) -> np.ndarray:
    """The histogram bin of each latency: ceil(log_gamma(x)), clipped to the int16 range it is stored in."""
    x = np.maximum(np.asarray(values_ms, dtype=float), MIN_LATENCY_MS)
    return np.clip(np.ceil(np.log(x) / _LOG_GAMMA), _MIN_BIN, _MAX_BIN).astype(np.int64)


@dataclass(frozen=True)
class LatencyHistogram:
    """A mergeable latency histogram: each quantile within RELATIVE_ACCURACY of a sample value at its rank."""

    counts: SparseCounts = field(default_factory=SparseCounts)

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> LatencyHistogram:
        return cls(SparseCounts.of_bins(latency_bins(np.fromiter(values_ms, dtype=float))))

    @property
    def count(self) -> int:
        return self.counts.total

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        return LatencyHistogram(self.counts.merge(other.counts))

    def value_at_rank(self, rank: int) -> float:
        """The value of the `rank`-th smallest sample (1-based), to within the relative accuracy."""
        cum = np.cumsum(self.counts.counts)
        i = int(np.searchsorted(cum, rank, side="left"))
        b = int(self.counts.bins[min(i, len(cum) - 1)])
        return 2 * GAMMA**b / (GAMMA + 1)

    def quantile(self, q: float) -> float | None:
        """The q-quantile as the rank ceil(n q) sample (numpy's 'inverted_cdf'); None when empty."""
        n = self.count
        return None if n == 0 else self.value_at_rank(min(n, max(1, math.ceil(n * q))))

    def __len__(self) -> int:
        return self.count


def score_bins(scores: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(np.asarray(scores, dtype=float) * SCORE_BINS), 0, SCORE_BINS - 1).astype(np.int64)


@dataclass(frozen=True)
class RequestFacts:
    """Requests of one bucket key: how many, how many failed (5xx), and their latencies."""

    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: RequestFacts) -> RequestFacts:
        return RequestFacts(
            self.requests + other.requests, self.errors + other.errors, self.latency.merge(other.latency)
        )


@dataclass(frozen=True)
class LabelFacts:
    """Predictions of one bucket key whose attribution window has closed, and their outcomes.

    Each closed prediction (served, with a score) is positive if a positive label arrived within the
    window, negative otherwise; `scores_pos`/`scores_neg` are its score's bins, for a binned AUC.
    """

    closed: int = 0
    positives: int = 0
    correct: int = 0  # (score >= 0.5) == outcome
    log_loss_sum: float = 0.0
    scores_pos: SparseCounts = field(default_factory=SparseCounts)
    scores_neg: SparseCounts = field(default_factory=SparseCounts)

    def merge(self, other: LabelFacts) -> LabelFacts:
        return LabelFacts(
            self.closed + other.closed,
            self.positives + other.positives,
            self.correct + other.correct,
            self.log_loss_sum + other.log_loss_sum,
            self.scores_pos.merge(other.scores_pos),
            self.scores_neg.merge(other.scores_neg),
        )

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.closed if self.closed else None

    @property
    def log_loss(self) -> float | None:
        return self.log_loss_sum / self.closed if self.closed else None

    def _binned(self) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)
        pos[self.scores_pos.bins] = self.scores_pos.counts
        neg[self.scores_neg.bins] = self.scores_neg.counts
        return pos, neg

    @property
    def auc(self) -> float | None:
        """Area under the ROC curve from the score bins, ties within a bin counted half."""
        pos, neg = self._binned()
        p, n = pos.sum(), neg.sum()
        if p == 0 or n == 0:
            return None
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (p * n))

    @property
    def auc_max_error(self) -> float | None:
        """The most the binned AUC can differ from the exact one: half the pairs that share a bin."""
        pos, neg = self._binned()
        p, n = pos.sum(), neg.sum()
        return None if p == 0 or n == 0 else float(0.5 * (pos * neg).sum() / (p * n))


@dataclass(frozen=True, order=True)
class BucketKey:
    """What a summary is kept per: a bucket of the prediction's time, its version, role, route, endpoint."""

    start: int
    version: int
    role: str
    route: str
    endpoint: str


def bucket_start(ts: float, bucket_s: int = BUCKET_S) -> int:
    return int(ts // bucket_s) * bucket_s


def request_facts(rows: Iterable[tuple]) -> dict[BucketKey, RequestFacts]:
    """Sum prediction-log rows (request_id, ts, version, role, route, endpoint, features, score, latency_ms,
    status) per bucket key: what the writer adds for each batch it inserts."""
    groups: dict[BucketKey, tuple[list[float], list[int]]] = {}
    for row in rows:
        ts = row[1]
        key = BucketKey(int(ts // BUCKET_S) * BUCKET_S, row[2], row[3], row[4], row[5])
        g = groups.get(key)
        if g is None:
            g = groups[key] = ([], [])
        g[0].append(row[8])
        g[1].append(row[9])
    out = {}
    for key, (lat, status) in groups.items():
        errors = sum(1 for s in status if s >= 500)
        out[key] = RequestFacts(len(lat), errors, LatencyHistogram.of(lat))
    return out


def outcomes(
    pred_ts: np.ndarray, label: np.ndarray, label_ts: np.ndarray, window_s: float
) -> np.ndarray:
    """1 where a positive label arrived within the attribution window, else 0 (no label, 0, or too late).

    `label` and `label_ts` are NaN where no label was stored.
    """
    within = ~np.isnan(label_ts) & (label_ts <= pred_ts + window_s)
    return (within & (label == 1)).astype(np.int64)


def label_facts(
    keys: list[BucketKey], scores: np.ndarray, outcome: np.ndarray
) -> dict[BucketKey, LabelFacts]:
    """Sum closed predictions' outcomes per bucket key (one entry of `keys` per prediction)."""
    scores = np.asarray(scores, dtype=float)
    outcome = np.asarray(outcome, dtype=np.int64)
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    loss = -(outcome * np.log(p) + (1 - outcome) * np.log(1 - p))
    right = (scores >= CORRECT_AT) == (outcome == 1)
    sbins = score_bins(scores)
    index: dict[BucketKey, list[int]] = {}
    for i, key in enumerate(keys):
        index.setdefault(key, []).append(i)
    out = {}
    for key, idx in index.items():
        ix = np.asarray(idx)
        y = outcome[ix]
        out[key] = LabelFacts(
            closed=len(ix),
            positives=int(y.sum()),
            correct=int(right[ix].sum()),
            log_loss_sum=float(loss[ix].sum()),
            scores_pos=SparseCounts.of_bins(sbins[ix][y == 1]),
            scores_neg=SparseCounts.of_bins(sbins[ix][y == 0]),
        )
    return out


def merge_into(acc: dict, facts: dict) -> dict:
    """Add `facts` into `acc` key by key (either RequestFacts or LabelFacts values)."""
    for key, value in facts.items():
        old = acc.get(key)
        acc[key] = value if old is None else old.merge(value)
    return acc


def total(values: Iterator | Iterable, empty):
    """The sum of mergeable facts, or `empty` when there are none."""
    out = empty
    for v in values:
        out = out.merge(v)
    return out
