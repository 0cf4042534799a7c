"""Small statistics shared by every stage (pure functions, float64, exact at the edges).

`wilson_interval` is the one Wilson score interval of the project: the calibration stage's reliability
diagrams and the align stage's judged win/tie/lose rates both use it.
"""

from __future__ import annotations

import math
import operator


Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a binomial proportion k/n; (0.0, 1.0) when n = 0.

    It is the set of p with |k/n - p| <= z sqrt(p (1 - p) / n). Computed without cancellation, so it holds
    at the edges in floating point too: the lower end is k^2 / (n (a + b)) with a = k + z^2/2 and
    b = z sqrt(k (n - k) / n + z^2/4) (the product form of a - b over n + z^2), exactly 0 at k = 0; the upper
    end is 1 minus the lower end of n - k, exactly 1 at k = n. Mathematically low <= k/n <= high; the ends are
    clamped to k/n (as Python computes it) so that this holds in floating point too, and a plot can draw k/n
    with error bars k/n - low and high - k/n that are never negative. The interval of n - k mirrors that of k. `k` and `n` must be integers with 0 <= k <= n."""
    k, n = operator.index(k), operator.index(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_interval: need integers 0 <= k <= n, got k={k}, n={n}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"wilson_interval: z must be a positive finite number, got {z!r}")
    if n == 0:
        return 0.0, 1.0  # no observation: every proportion is possible
    p = k / n
    return min(p, _wilson_low(k, n, z)), max(p, 1.0 - _wilson_low(n - k, n, z))


def _wilson_low(k: int, n: int, z: float) -> float:
    if k == 0:
        return 0.0
    z2 = z * z
    a = k + z2 / 2
    b = z * math.sqrt(k * (n - k) / n + z2 / 4)
    return k * k / (n * (a + b))
