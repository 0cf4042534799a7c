"""Small statistics shared by every stage (pure functions, float64, exact at the edges; a leaf: imports nothing
of the pipeline, scipy only inside the functions that need it).

`wilson_interval` is the one Wilson score interval of the project: the calibration stage's reliability
diagrams and the align stage's judged win/tie/lose rates both use it.

`is_significant` is the project's one significance rule: the interval excludes 0 AND p < `ALPHA` strictly
(the calibration stage's paired bootstrap comparisons and the sweep's seed-paired differences both use it).

Across seeds (pipeline.sweep): `t_interval` (mean, sd and the two-sided t-interval of the mean),
`paired_differences` (the seed-paired differences of two RMs) and `t_test_p` (the p-value of the one-sample
t-test the t-interval inverts), tested against scipy and hand-computed values.
"""

from __future__ import annotations

import math
import operator


Z95 = 1.959963984540054  # the two-sided 95% normal quantile
CONFIDENCE = 0.95  # the level of the t-intervals over seeds
ALPHA = 0.05  # a difference is significant only when p < ALPHA (strictly) and the interval excludes 0


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


def is_significant(low, high, p_value, alpha: float = ALPHA) -> bool | None:
    """The project's one significance rule: the interval [low, high] excludes 0 (an end exactly at 0 does not
    exclude it) AND p < alpha strictly (p = 0.050 is not significant). None when the interval or p is missing."""
    if low is None or high is None or p_value is None:
        return None
    return bool((low > 0 or high < 0) and p_value < alpha)


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """Mean, sample sd (ddof=1), n and the two-sided t-interval of the mean over `values` (None skipped).

    With n < 2 there is no sd and no interval (their fields are None); with sd = 0 the interval is the mean.
    """
    from scipy.stats import t as student_t

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out = {"mean": None, "sd": None, "n": n, "low": None, "high": None, "confidence": confidence}
    if n == 0:
        return out
    mean, sd = _mean_sd(xs)
    out["mean"] = mean
    if n < 2:
        return out
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, low=mean - half, high=mean + half)
    return out


def t_test(values, confidence: float = CONFIDENCE) -> dict:
    """`t_interval` of `values` plus `p_value`, the two-sided one-sample t-test of mean = 0 it inverts (for
    paired differences: the paired t-test)."""
    stats = t_interval(values, confidence)
    return stats | {"p_value": t_test_p(stats["mean"], stats["sd"], stats["n"])}


def _mean_sd(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd (None for one value); values near the float limit (1e300) are scaled first, so the
    sums cannot overflow (the result is then exact to rounding, or inf where the sd itself is beyond it)."""
    n = len(xs)
    try:
        mean = math.fsum(xs) / n
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    except OverflowError:
        scale = max(abs(x) for x in xs)
        m, s = _mean_sd([x / scale for x in xs])
        mean, sd = m * scale, (None if s is None else s * scale)
    return mean, sd


def paired_differences(a: dict, b: dict) -> dict:
    """{seed: a[seed] - b[seed]} over the seeds where both have a value (the pairing removes seed noise
    shared by both RMs, e.g. the data draw)."""
    return {s: a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None}


def t_test_p(mean: float | None, sd: float | None, n: int) -> float | None:
    """Two-sided p-value of the one-sample t-test of mean = 0 (the test the t-interval inverts); None when
    n < 2. With sd = 0: 0 for a non-zero mean, 1 for a zero mean."""
    from scipy.stats import t as student_t

    if mean is None or sd is None or n < 2:
        return None
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2.0 * student_t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
