"""Request and response bodies of the Bento's HTTP API, as Pydantic models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

N_FEATURES = 16
MAX_CANDIDATES = 1000
MAX_ITEM_ID_CHARS = 128

# strict: "1.5", true and null are refused rather than coerced; NaN and +-Infinity are refused
# too (Python's JSON accepts the `NaN` / `Infinity` literals, and 1e400 overflows to infinity).
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
FeatureVector = Annotated[list[Feature], Field(min_length=N_FEATURES, max_length=N_FEATURES)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictRequest(_Strict):
    """One impression to score."""

    features: FeatureVector


class Candidate(_Strict):
    """One item the caller wants ranked."""

    item_id: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ITEM_ID_CHARS)]
    features: FeatureVector


class RecommendRequest(_Strict):
    """Candidates to rank; the top `k` come back (all of them when there are fewer than `k`)."""

    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=MAX_CANDIDATES)]
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_CANDIDATES)] = 10

    @field_validator("candidates")
    @classmethod
    def _unique_item_ids(cls, candidates: list[Candidate]) -> list[Candidate]:
        seen: set[str] = set()
        for c in candidates:
            if c.item_id in seen:
                raise ValueError(f"duplicate item_id {c.item_id!r}: each candidate must appear once")
            seen.add(c.item_id)
        return candidates


class PredictResponse(BaseModel):
    """The click probability and which model produced it."""

    request_id: str
    score: float
    model_version: int
    role: str


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    """The top-k candidates, best first."""

    request_id: str
    items: list[ScoredItem]
    model_version: int
    role: str
