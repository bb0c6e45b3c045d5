"""Plain JSON values all the way down: numpy numbers become Python's, non-finite numbers None."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def jsonable(x: Any) -> Any:
    """`x` with dict keys as strings, tuples as lists, numpy scalars as Python's, inf and nan as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.generic | np.ndarray) and np.ndim(x) == 0:
        return jsonable(x.item())
    return x
