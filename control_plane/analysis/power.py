"""Planning numbers from a power calculation: the sample at which a decision is expected, and the minimum."""

from __future__ import annotations

import math
from statistics import NormalDist

_Z = NormalDist().inv_cdf


def samples_per_arm(
    p_base: float,
    lift: float,
    margin: float = 0.0,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
) -> int:
    """Canary sample (baseline = ratio x that) for a one-sided fixed-horizon z-test of lift > margin."""
    if lift <= margin:
        raise ValueError(f"lift {lift} must exceed margin {margin} for a power calculation")
    p_c = min(max(p_base + lift, 1e-6), 1 - 1e-6)
    variance = p_c * (1 - p_c) + p_base * (1 - p_base) / ratio
    return math.ceil((_Z(1 - alpha) + _Z(power)) ** 2 * variance / (lift - margin) ** 2)


def minimum_labelled(p_base: float, effect: float = 0.05, alpha: float = 0.05, power: float = 0.8) -> int:
    """Labels per arm below which even an `effect`-sized accuracy change is unlikely to show: no decision before."""
    return samples_per_arm(p_base, effect, 0.0, alpha, power)
