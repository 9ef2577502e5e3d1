"""Uncertainty of the numbers cliviz compares: binomial intervals and multiple-comparison corrections.

An accuracy of 0.800 on 10 questions means "somewhere between 0.49 and 0.94": `wilson_interval`
gives that 95% interval (Wilson's score interval, which stays inside [0, 1] and behaves at 0 and
n, unlike the normal approximation). Many p-values read together need a correction, or one in
twenty is "significant" by chance: `holm` (family-wise error, what the faithfulness report uses)
and `benjamini_hochberg` (false discovery rate). Pure Python and numpy: no torch, cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n`: `(low, high)`; NaN for n = 0.

    Example: `wilson_interval(8, 10)` -> (0.490, 0.943)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, not 1e-17 off
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def format_interval(low: float, high: float, digits: int = 2) -> str:
    """`0.49–0.94` (or `n/a` when undefined)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"{low:.{digits}f}–{high:.{digits}f}"


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down; controls the family-wise error rate). NaN stays
    NaN and does not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values; controls the false discovery rate). NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, p[i] * m / (rank + 1))
        out[i] = min(1.0, running)
    return out
