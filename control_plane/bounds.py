"""What a request may carry: how deep its JSON nests, which integers an id can be, which text a database keeps.

Every request body the control plane parses goes through `load_json_body`, so a hostile body is a 400
that names the problem before it reaches Python's recursive parser (100,000 nested `[` is a
RecursionError there), the service layer or a database driver (a lone surrogate cannot be encoded as
UTF-8; Postgres refuses NUL in text). Ids and versions are checked against `MAX_ROW_INT` where they
are parsed, so 2**63 is never handed to SQLite (an OverflowError) nor to MLflow.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from control_plane.errors import InvalidRequest

# Deeper than any body this API takes (a policy object holds a list: depth 3), shallow enough that
# nothing downstream recurses far on it.
MAX_JSON_DEPTH = 32
# Ids and versions live in INTEGER columns: 32 bits on Postgres (and in MLflow's registry tables).
MAX_ROW_INT = 2**31 - 1

# A JSON string, escapes included (written unrolled so that an unterminated one cannot backtrack).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
# Text no database here stores: NUL (Postgres refuses it), UTF-16 surrogates (not encodable as UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (0 for a scalar), without parsing it.

    Brackets inside strings do not count. Linear in the size (1 MB in a few milliseconds).
    """
    skeleton = _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    if not skeleton:
        return 0
    steps = np.where(np.frombuffer(skeleton, dtype=np.uint8) == ord("["), 1, -1)
    return int(np.cumsum(steps, dtype=np.int64).max())


def unstorable_text(value: Any, where: str = "body") -> str | None:
    """Where the first string (a key or a value) holding a NUL or a lone surrogate is, or None."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if _UNSTORABLE.search(key):
                    return f"a key of {path}"
                stack.append((child, f"{path}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def load_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body parsed as JSON, or InvalidRequest (400) naming what is wrong with it.

    Refused: text that is not JSON, NaN and Infinity (not JSON numbers), nesting deeper than
    `max_depth`, and strings a database cannot store (NUL, lone surrogates).
    """
    depth = json_depth(raw)
    if depth > max_depth:
        raise InvalidRequest(f"request body nests {depth} levels deep; the limit is {max_depth}")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    where = unstorable_text(data)
    if where is not None:
        raise InvalidRequest(
            f"{where[:120]} holds a NUL character or a lone UTF-16 surrogate, which cannot be stored"
        )
    return data


def check_row_int(value: int, what: str) -> int:
    """`value` if it is a positive integer an id or version column can hold, else InvalidRequest."""
    if not 1 <= value <= MAX_ROW_INT:
        raise InvalidRequest(f"{what} must be between 1 and {MAX_ROW_INT}, got {value}")
    return value


def row_int_in_range(value: int) -> bool:
    """Whether `value` can be a row's id at all (ids outside it name nothing: a 404, not a query)."""
    return 1 <= value <= MAX_ROW_INT


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")
