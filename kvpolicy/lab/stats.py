"""Uncertainty of measured accuracies: the lab reports a 95% interval beside every score."""

from __future__ import annotations

import math


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for ``z = 1.96``); ``(0, 1)`` for ``n = 0``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%: 20 of 20 gives
    [0.84, 1.00].
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
