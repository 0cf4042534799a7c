"""Temperature scaling of a reward model (Guo et al. 2017, applied to Bradley-Terry pair probabilities).

One temperature T > 0 per RM, fitted on validation pairs by minimising the NLL of the labels,
    NLL(T) = mean_i log(1 + exp(-d_i / T)),  d_i = r_chosen_i - r_rejected_i.
NLL is convex in beta = 1/T, hence unimodal in log T; we minimise it over log T inside bounds with
bounded Brent (scipy `minimize_scalar`), to ~1e-10 in log T. Dividing rewards by T never changes
which response wins, so accuracy is unchanged and only the confidence moves.

Degenerate cases: all margins zero -> NLL is flat, T = 1; every margin on the right side (separable)
-> the NLL keeps falling as T -> 0 and the lower bound is returned; a worse-than-chance RM pushes T
to the upper bound (p -> 0.5). The result says which bound was hit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from pipeline.calibration.metrics import reward_margins


# Search range for T relative to the typical margin size: 1e-4 .. 1e4 times the median |d|.
RELATIVE_RANGE = 1e4
# Fewer validation pairs than this and the fitted T is noise-dominated: with margins of typical size (|d| ~ 1,
# p (1 - p) ~ 0.2) the standard error of 1/T is about 1 / sqrt(0.2 n), i.e. +-22% at n = 100, +-58% at n = 15.
# The stage warns (log, table.md, report) below it.
MIN_PAIRS = 100


def few_pairs_warning(n_pairs: int) -> str | None:
    """The warning for a temperature fitted on fewer than MIN_PAIRS validation pairs (None otherwise)."""
    if n_pairs >= MIN_PAIRS:
        return None
    return (
        f"the temperature was fitted on only {n_pairs} validation pairs (fewer than {MIN_PAIRS}, "
        "pipeline.calibration.temperature.MIN_PAIRS): T and every temperature-scaled number are noisy (1/T's "
        f"standard error is roughly +-{100 / (0.2 * max(n_pairs, 1)) ** 0.5:.0f}% here). Fix: give the sources more "
        "validation pairs (data.valid_fraction, data.n_valid_per_source) or read the scaled numbers with care"
    )


@dataclass
class TemperatureFit:
    temperature: float
    nll_before: float
    nll_after: float
    n_pairs: int
    at_bound: str | None  # None, "lower" or "upper"

    def to_dict(self) -> dict:
        return asdict(self)


def nll_at(margins: np.ndarray, temperature: float) -> float:
    return float(np.mean(np.logaddexp(0.0, -np.asarray(margins, dtype=np.float64) / temperature)))


def temperature_bounds(margins: np.ndarray) -> tuple[float, float]:
    a = np.abs(margins[margins != 0])
    scale = float(np.median(a)) if a.size else 1.0
    return scale / RELATIVE_RANGE, scale * RELATIVE_RANGE


def fit_temperature(chosen_rewards, rejected_rewards, *, bounds: tuple[float, float] | None = None) -> TemperatureFit:
    """The NLL-minimising temperature for these pairs (see the module docstring)."""
    d = reward_margins(chosen_rewards, rejected_rewards)
    before = nll_at(d, 1.0)
    if not np.any(d != 0):
        return TemperatureFit(1.0, before, before, int(d.size), None)
    lo, hi = bounds if bounds is not None else temperature_bounds(d)
    if not (0 < lo < hi):
        raise ValueError(f"temperature bounds must satisfy 0 < lower < upper, got {bounds!r}")
    log_lo, log_hi = math.log(lo), math.log(hi)

    def objective(u: float) -> float:
        return nll_at(d, math.exp(u))

    res = minimize_scalar(
        objective, bounds=(log_lo, log_hi), method="bounded", options={"xatol": 1e-10, "maxiter": 500}
    )
    u = float(res.x)
    # Brent never evaluates the bounds themselves: compare against them explicitly.
    candidates = [(objective(u), u), (objective(log_lo), log_lo), (objective(log_hi), log_hi)]
    best_nll, u = min(candidates)
    at_bound = "lower" if u - log_lo < 1e-6 else "upper" if log_hi - u < 1e-6 else None
    return TemperatureFit(math.exp(u), before, best_nll, int(d.size), at_bound)
