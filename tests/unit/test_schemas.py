"""The Bento's request bodies refuse every malformed input with a message that names the problem."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bentos.schemas import MAX_CANDIDATES, N_FEATURES, PredictRequest, RecommendRequest

GOOD = [0.5] * N_FEATURES


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def errors(model, raw: bytes) -> list[dict]:
    with pytest.raises(ValidationError) as excinfo:
        model.model_validate_json(raw)
    return excinfo.value.errors(include_url=False)


def candidates(n: int, features=GOOD) -> list[dict]:
    return [{"item_id": f"item-{i}", "features": features} for i in range(n)]


def test_accepts_sixteen_numbers_ints_included():
    req = PredictRequest.model_validate_json(body({"features": [1] * 8 + [0.25] * 8}))
    assert req.features == [1.0] * 8 + [0.25] * 8


@pytest.mark.parametrize(
    ("raw", "loc", "words"),
    [
        (body({"features": [0.5] * 15}), ("features",), "at least 16"),
        (body({"features": [0.5] * 17}), ("features",), "at most 16"),
        (body({"features": []}), ("features",), "at least 16"),
        (body({"features": ["0.5"] + [0.5] * 15}), ("features", 0), "valid number"),
        (body({"features": [None] + [0.5] * 15}), ("features", 0), "valid number"),
        (body({"features": [True] + [0.5] * 15}), ("features", 0), "valid number"),
        (b'{"features": [NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', ("features", 0), "finite"),
        (b'{"features": [1, Infinity, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', ("features", 1), "finite"),
        (
            b'{"features": [1, 1, -Infinity, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}',
            ("features", 2),
            "finite",
        ),
        (b'{"features": [1e400, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}', ("features", 0), "finite"),
        (body({"features": "0.5"}), ("features",), "valid array"),
        (body({"features": None}), ("features",), "valid array"),
        (body({}), ("features",), "required"),
        (body({"features": GOOD, "feature": GOOD}), ("feature",), "not permitted"),
        (body(GOOD), (), "object"),
        (b"null", (), "object"),
        (b'{"features": [1, 2', (), "Invalid JSON"),
        (b"", (), "Invalid JSON"),
    ],
)
def test_predict_refuses(raw, loc, words):
    errs = errors(PredictRequest, raw)
    assert any(e["loc"] == loc and words in e["msg"] for e in errs), errs


def test_recommend_accepts_candidates_and_defaults_k_to_10():
    req = RecommendRequest.model_validate_json(body({"candidates": candidates(3)}))
    assert req.k == 10 and [c.item_id for c in req.candidates] == ["item-0", "item-1", "item-2"]


def test_recommend_allows_k_above_the_number_of_candidates():
    assert RecommendRequest.model_validate_json(body({"candidates": candidates(2), "k": 5})).k == 5


@pytest.mark.parametrize(
    ("obj", "loc", "words"),
    [
        ({"candidates": [], "k": 1}, ("candidates",), "at least 1"),
        (
            {"candidates": candidates(MAX_CANDIDATES + 1), "k": 1},
            ("candidates",),
            f"at most {MAX_CANDIDATES}",
        ),
        ({"candidates": candidates(2), "k": 0}, ("k",), "greater than or equal to 1"),
        ({"candidates": candidates(2), "k": -3}, ("k",), "greater than or equal to 1"),
        (
            {"candidates": candidates(2), "k": MAX_CANDIDATES + 1},
            ("k",),
            f"less than or equal to {MAX_CANDIDATES}",
        ),
        ({"candidates": candidates(2), "k": "3"}, ("k",), "valid integer"),
        ({"candidates": candidates(2), "k": 2.5}, ("k",), "valid integer"),
        ({"candidates": candidates(2), "k": None}, ("k",), "valid integer"),
        ({"candidates": candidates(2, [0.5] * 3), "k": 1}, ("candidates", 0, "features"), "at least 16"),
        (
            {"candidates": [{"item_id": "a", "features": GOOD}] * 2, "k": 1},
            ("candidates",),
            "duplicate item_id 'a'",
        ),
        (
            {"candidates": [{"item_id": "", "features": GOOD}], "k": 1},
            ("candidates", 0, "item_id"),
            "at least 1",
        ),
        (
            {"candidates": [{"item_id": 7, "features": GOOD}], "k": 1},
            ("candidates", 0, "item_id"),
            "valid string",
        ),
        (
            {"candidates": [{"item_id": "x" * 129, "features": GOOD}], "k": 1},
            ("candidates", 0, "item_id"),
            "at most 128",
        ),
        ({"candidates": [{"features": GOOD}], "k": 1}, ("candidates", 0, "item_id"), "required"),
        ({"candidates": None, "k": 1}, ("candidates",), "valid array"),
        ({"k": 1}, ("candidates",), "required"),
    ],
)
def test_recommend_refuses(obj, loc, words):
    errs = errors(RecommendRequest, body(obj))
    assert any(e["loc"] == loc and words in e["msg"] for e in errs), errs


def test_recommend_refuses_nan_inside_a_candidate():
    raw = b'{"candidates": [{"item_id": "a", "features": [NaN' + b", 1" * 15 + b"]}], " + b'"k": 1}'
    errs = errors(RecommendRequest, raw)
    assert errs[0]["loc"] == ("candidates", 0, "features", 0) and "finite" in errs[0]["msg"]
