"""The shared input bounds: JSON depth measured without parsing, text a database refuses, ids in range."""

from __future__ import annotations

import json

import pytest

from control_plane.bounds import (
    MAX_JSON_DEPTH,
    MAX_ROW_INT,
    check_row_int,
    json_depth,
    load_json_body,
    unstorable_text,
)
from control_plane.errors import InvalidRequest


@pytest.mark.parametrize(
    "text, depth",
    [
        ('"x"', 0),
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "]]]"]', 1),  # brackets inside strings do not count
        ('["\\"[[[", {"k\\\\": [[]]}]', 4),  # nor after escaped quotes and backslashes
        ("[" * 100_000, 100_000),
        ("[[]][[[]]]", 3),
    ],
)
def test_depth_is_measured_without_parsing(text, depth):
    assert json_depth(text.encode()) == depth


def test_depth_of_a_real_body_matches_its_structure():
    body = {"labels": [{"request_id": "a]]]" * 3, "label": 1}] * 50}
    assert json_depth(json.dumps(body).encode()) == 3


def test_an_unterminated_string_is_left_to_the_parser():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        load_json_body(b'{"a": "' + b"x" * 200_000)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_bodies_nested_past_the_limit_are_refused_naming_the_depth(depth):
    raw = ("[" * depth + "]" * depth).encode()
    with pytest.raises(InvalidRequest, match=f"nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}"):
        load_json_body(raw)


def test_unbalanced_deep_nesting_is_refused_before_the_parser_recurses():
    with pytest.raises(InvalidRequest, match="100000 levels deep"):
        load_json_body(b'{"labels": ' + b"[" * 99_999)


def test_nesting_at_the_limit_is_parsed():
    raw = ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode()
    assert isinstance(load_json_body(raw), list)


@pytest.mark.parametrize(
    "raw, where",
    [
        (b'{"request_id": "\\ud800", "label": 1}', "body.request_id"),
        (b'{"request_id": "a\\u0000b", "label": 1}', "body.request_id"),
        (b'[{"request_id": "ok"}, {"request_id": "\\udfff"}]', "body[1].request_id"),
        (b'{"labels": [{"x\\u0000": 1}]}', "a key of body.labels[0]"),
        ('{"request_id": "\ud800"}'.encode("utf-8", "surrogatepass"), "body.request_id"),  # raw, unescaped
    ],
)
def test_text_a_database_refuses_is_refused_naming_where(raw, where):
    with pytest.raises(InvalidRequest, match="NUL character or a lone UTF-16 surrogate") as info:
        load_json_body(raw)
    assert str(info.value).startswith(where)


def test_paired_surrogates_and_other_control_characters_are_text_like_any_other():
    assert load_json_body(b'{"a": "\\ud83d\\ude00 \\t\\u0001"}') == {"a": "\U0001f600 \t\x01"}
    assert unstorable_text({"a": ["fine", {"b": "also fine"}]}) is None


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b"{", b"\xff\xfe", b"1" * 5000])
def test_what_is_not_json_is_refused_with_a_message(raw):
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        load_json_body(raw)


@pytest.mark.parametrize("value", [0, -1, MAX_ROW_INT + 1, 2**63, 10**30])
def test_ids_past_what_a_column_holds_are_refused_naming_the_range(value):
    with pytest.raises(InvalidRequest, match=f"between 1 and {MAX_ROW_INT}, got {value}"):
        check_row_int(value, "field 'version'")


def test_ids_in_range_pass():
    assert check_row_int(MAX_ROW_INT, "v") == MAX_ROW_INT and check_row_int(1, "v") == 1
