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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

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


_ENTRY = np.dtype([("bin", "<i2"), ("count", "<u4")])  # 6 bytes a bin; a blob is these back to back


class SparseCounts:
    """Counts per integer bin; merges by addition. Stored as (int16 bin, uint32 count) entries back to
    back, so that many blobs are summed by joining their bytes and decoding once (`concat`)."""

    __slots__ = ("_bins", "_counts", "_raw")

    def __init__(
        self, bins: np.ndarray | None = None, counts: np.ndarray | None = None, raw: bytes | None = None
    ):
        self._raw = raw
        self._bins = None if raw is not None else np.asarray([] if bins is None else bins, dtype=np.int64)
        self._counts = (
            None if raw is not None else np.asarray([] if counts is None else counts, dtype=np.int64)
        )

    def _decode(self) -> None:
        entries = np.frombuffer(self._raw, dtype=_ENTRY)
        self._bins, self._counts = entries["bin"].astype(np.int64), entries["count"].astype(np.int64)

    @property
    def bins(self) -> np.ndarray:
        if self._bins is None:
            self._decode()
        return self._bins

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._decode()
        return self._counts

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
        """The sum of many at once: their stored bytes joined and decoded once, one sort."""
        return cls.summed(b"".join(p.to_bytes() for p in parts))

    @classmethod
    def summed(cls, blobs: bytes) -> SparseCounts:
        """The sum of stored blobs joined back to back (bins may repeat across them)."""
        if not blobs:
            return cls()
        entries = np.frombuffer(blobs, dtype=_ENTRY)
        b, inverse = np.unique(entries["bin"], return_inverse=True)
        c = np.bincount(inverse, weights=entries["count"], minlength=len(b))
        return cls(b, c.astype(np.int64))

    def to_bytes(self) -> bytes:
        if self._raw is not None:
            return self._raw
        entries = np.empty(len(self._bins), dtype=_ENTRY)
        entries["bin"], entries["count"] = self._bins, self._counts
        return entries.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> SparseCounts:
        return cls() if not data else cls(raw=bytes(data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseCounts) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"SparseCounts({dict(zip(self.bins.tolist(), self.counts.tolist(), strict=True))})"


_MIN_BIN = math.ceil(math.log(MIN_LATENCY_MS) / _LOG_GAMMA)
_MAX_BIN = math.ceil(math.log(MAX_LATENCY_MS) / _LOG_GAMMA)
_BIN_SPAN = _MAX_BIN - _MIN_BIN + 1


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
    # Of `closed`, the /recommend exposures (analysis/ranking.py), and the 1-based positions as served
    # of their clicks within the window (counts per position): the ranking metrics' sums.
    ranked: int = 0
    click_positions: SparseCounts = field(default_factory=SparseCounts)

    def merge(self, other: LabelFacts) -> LabelFacts:
        return LabelFacts(
            self.closed + other.closed,
            self.positives + other.positives,
            self.correct + other.correct,
            self.log_loss_sum + other.log_loss_sum,
            self.scores_pos.merge(other.scores_pos),
            self.scores_neg.merge(other.scores_neg),
            self.ranked + other.ranked,
            self.click_positions.merge(other.click_positions),
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


class BucketKey(NamedTuple):
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
    status) per bucket key: what the writer adds for each batch it inserts (vectorised: a batch is
    typically one version's last 0.1-1 s, one or two keys)."""
    rows = rows if isinstance(rows, list) else list(rows)
    if not rows:
        return {}
    cols = list(zip(*rows, strict=True))  # the table's columns (user_key, the 11th, is summed elsewhere)
    ts, versions, roles, routes, endpoints, latency, status = (cols[i] for i in (1, 2, 3, 4, 5, 8, 9))
    starts = np.asarray(ts, dtype=float) // BUCKET_S * BUCKET_S
    same = set(zip(versions, roles, routes, endpoints, strict=True))
    index: dict[tuple, int] = {}
    if len(same) == 1:  # one version's writer: group by bucket alone, in numpy
        (rest,) = same
        uniq, inv = np.unique(starts.astype(np.int64), return_inverse=True)
        index = {(int(start), *rest): i for i, start in enumerate(uniq.tolist())}
    else:
        keys = zip(starts.astype(np.int64).tolist(), versions, roles, routes, endpoints, strict=True)
        inv = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(rows))
    g = len(index)
    requests = np.bincount(inv, minlength=g)
    errors = np.bincount(inv, weights=np.asarray(status) >= 500, minlength=g)
    bins = latency_bins(np.asarray(latency, dtype=float))
    cells, counts = np.unique(inv * _BIN_SPAN + (bins - _MIN_BIN), return_counts=True)
    group, cell_bins = cells // _BIN_SPAN, cells % _BIN_SPAN + _MIN_BIN
    edges = np.searchsorted(group, np.arange(g + 1))
    return {
        BucketKey._make(key): RequestFacts(
            int(requests[i]),
            int(errors[i]),
            LatencyHistogram(
                SparseCounts(cell_bins[edges[i] : edges[i + 1]], counts[edges[i] : edges[i + 1]])
            ),
        )
        for key, i in index.items()
    }


def outcomes(pred_ts: np.ndarray, label: np.ndarray, label_ts: np.ndarray, window_s: float) -> np.ndarray:
    """1 where a positive label arrived within the attribution window, else 0 (no label, 0, or too late).

    `label` and `label_ts` are NaN where no label was stored.
    """
    within = ~np.isnan(label_ts) & (label_ts <= pred_ts + window_s)
    return (within & (label == 1)).astype(np.int64)


RANKED_ENDPOINT = "recommend"  # the endpoint whose predictions are exposures of a served list


def label_facts(
    keys: Iterable[tuple],
    scores: np.ndarray,
    outcome: np.ndarray,
    click_position: np.ndarray | None = None,
) -> dict[BucketKey, LabelFacts]:
    """Sum closed predictions' outcomes per bucket key (one entry of `keys` per prediction), vectorised.

    `click_position` (NaN or 0 where none) is the 1-based position as served of a /recommend request's
    click; it counts toward the ranking sums only where the outcome is positive (within the window).
    """
    scores = np.asarray(scores, dtype=float)
    y = np.asarray(outcome, dtype=np.int64)
    if not len(y):
        return {}
    index: dict[tuple, int] = {}
    inv = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(y))
    g = len(index)
    ranked_key = np.fromiter((k[4] == RANKED_ENDPOINT for k in index), dtype=bool, count=g)
    pos = np.zeros(len(y)) if click_position is None else np.nan_to_num(np.asarray(click_position, float))
    clicked = (y == 1) & (pos >= 1) & ranked_key[inv]
    click_groups, click_pos = inv[clicked], pos[clicked].astype(np.int64)
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    right = (scores >= CORRECT_AT) == (y == 1)
    cell = inv * SCORE_BINS + score_bins(scores)
    pos_bins = np.bincount(cell[y == 1], minlength=g * SCORE_BINS).reshape(g, SCORE_BINS)
    neg_bins = np.bincount(cell[y == 0], minlength=g * SCORE_BINS).reshape(g, SCORE_BINS)
    closed = np.bincount(inv, minlength=g)
    positives = np.bincount(inv, weights=y, minlength=g)
    correct = np.bincount(inv, weights=right, minlength=g)
    losses = np.bincount(inv, weights=loss, minlength=g)

    def sparse(row: np.ndarray) -> SparseCounts:
        nz = np.flatnonzero(row)
        return SparseCounts(nz, row[nz])

    def clicks(i: int) -> SparseCounts:
        return SparseCounts.of_bins(click_pos[click_groups == i]) if ranked_key[i] else SparseCounts()

    return {
        BucketKey._make(key): LabelFacts(
            int(closed[i]),
            int(positives[i]),
            int(correct[i]),
            float(losses[i]),
            sparse(pos_bins[i]),
            sparse(neg_bins[i]),
            int(closed[i]) if ranked_key[i] else 0,
            clicks(i),
        )
        for key, i in index.items()
    }


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
