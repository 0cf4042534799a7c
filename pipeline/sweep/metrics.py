"""How a sweep reads its metric rows: which differences it reports (`PAIRS`), each metric's label, unit and
range, and the verdict and sentence of a seed-paired difference.

Intervals of a metric's mean are clipped to its range (`bounded_interval`: accuracy in [0, 1], ECE >= 0,
T >= 0; the t-interval's own ends are kept as t_low / t_high); differences are not clipped. A difference row
is judged by the project's one rule (`is_significant`: pipeline.stats.is_significant on the row's interval
and p-value), its better direction comes from pipeline.calibration.compare.direction, and
`difference_sentence` says it in words.

Imports: the leaf pipeline.stats and pipeline.calibration.compare (`direction`, `p_text`); nothing of the sweep.
"""

from __future__ import annotations

import re

from pipeline.calibration.compare import direction, p_text
from pipeline.stats import is_significant as significance_rule
from pipeline.stats import t_test_p


# Seed-paired differences reported for every grid point: (a, b) means a - b.
PAIRS = (("more", "multitask"), ("more", "uniform"), ("uniform", "multitask"))
# Fewer seeds than this: the t-interval (t = 12.7 for 2 seeds) is reported with a warning.
MIN_SEEDS = 3
# Shown in percent / percentage points in every table and plot (summary.json keeps fractions, as metrics.json).
PERCENT_METRICS = ("accuracy", "win_rate", "lose_rate", "win_minus_lose")


def is_significant(stats: dict) -> bool | None:
    """The project's rule (pipeline.stats.is_significant) on a seed-paired difference: the t-interval excludes 0
    AND p < 0.05 strictly; None without an interval. p comes from the row, or from its mean, sd and n
    (summaries written before p-values were stored)."""
    p = stats.get("p_value")
    if p is None:
        p = t_test_p(stats.get("mean"), stats.get("sd"), stats.get("n", 0))
    return significance_rule(stats.get("low"), stats.get("high"), p)


# The range of each metric's values: (low, high), None = unbounded on that side.
_UNIT = (0.0, 1.0)
METRIC_RANGES = {
    "accuracy": _UNIT,
    "brier": _UNIT,
    "truth_mae": _UNIT,
    "gold_mae": _UNIT,
    "win_rate": _UNIT,
    "lose_rate": _UNIT,
    "win_minus_lose": (-1.0, 1.0),
    "nll": (0.0, None),
    "temperature": (0.0, None),
    "perplexity": (1.0, None),
}


def metric_range(metric: str) -> tuple[float | None, float | None]:
    """The values a metric can take; ECEs lie in [0, 1]; unknown metrics (gold reward) are unbounded."""
    base = metric[3:] if metric.startswith("ts_") else metric
    if re.fullmatch(r"(truth_)?ece_\d+", base):
        return _UNIT
    return METRIC_RANGES.get(base, (None, None))


def bounded_interval(stats: dict, metric: str) -> dict:
    """`stats` with its interval clipped to the metric's range (accuracy in [0, 1], ECE >= 0, T >= 0, ...).

    The t-interval of a mean is symmetric and ignores the range, so with few seeds it can reach impossible
    values (accuracy above 1, a negative ECE). We keep the t-interval (so it matches scipy and the seed-paired
    differences, which are not clipped) and clip its ends to the range: the clipped interval holds exactly
    the possible values of the t-interval. `clipped` names the ends that were moved; `t_low`/`t_high` keep
    the unclipped ends."""
    out = dict(stats)
    lo, hi = metric_range(metric)
    clipped = []
    if out.get("low") is not None and lo is not None and out["low"] < lo:
        out["t_low"], out["low"] = out["low"], lo
        clipped.append("low")
    if out.get("high") is not None and hi is not None and out["high"] > hi:
        out["t_high"], out["high"] = out["high"], hi
        clipped.append("high")
    if clipped:
        out["clipped"] = clipped
    return out


def judge(d: dict) -> tuple[str, str | None] | None:
    """A significant difference row's (side, judgement): side 'lower'/'higher' (a vs b), judgement 'better',
    'worse' (for a) or None where the metric has no direction or, for a temperature (closer to 1 is better),
    the two means are unknown or lie on opposite sides of 1. None when not significant (`is_significant`)."""
    if not is_significant(d):
        return None
    side = "lower" if d["mean"] < 0 else "higher"
    better = d.get("better", direction(d.get("metric", "")))
    if better in ("lower", "higher"):
        return side, "better" if side == better else "worse"
    ma, mb = d.get("a_mean"), d.get("b_mean")
    if better == "closer to 1" and ma is not None and mb is not None and (ma - 1) * (mb - 1) >= 0:
        return side, "better" if abs(ma - 1) < abs(mb - 1) else "worse"
    return side, None


def difference_sentence(
    a: str, b: str, what: str, stats: dict, better: str | None, *, scale: float = 1.0, unit: str = ""
) -> str:
    """One sentence about the seed-paired difference a - b, following the rule (`is_significant`): otherwise
    "no significant difference"; if significant, say which is lower/higher and which is better. For
    `better` = 'closer to 1' (a temperature) the verdict needs the two means (`a_mean`, `b_mean` in stats)
    on the same side of 1. `scale`, `unit`: accuracy is written in percentage points (scale 100)."""
    n = stats.get("n", 0)
    digits = 2 if scale == 100 else 4

    def v(x):
        return f"{x * scale:+.{digits}f}{unit}"

    if stats.get("mean") is None:
        return f"{what}: {a} - {b} not available (no seed has both)."
    sig = is_significant(stats)
    if sig is None:
        return f"{what}: {a} - {b} = {v(stats['mean'])} from {n} paired seed(s); too few seeds for an interval."
    p = stats.get("p_value", t_test_p(stats["mean"], stats.get("sd"), n))
    ci = (
        f"{a} - {b} = {v(stats['mean'])}, {100 * stats['confidence']:.0f}% CI "
        f"[{v(stats['low'])}, {v(stats['high'])}], {p_text(p)}, {n} paired seeds"
    )
    if n < MIN_SEEDS:
        ci += f"; fewer than {MIN_SEEDS} seeds, a very wide interval"
    if not sig:
        return f"{what}: no significant difference between {a} and {b} ({ci})."
    side = "lower" if stats["mean"] < 0 else "higher"
    if better == "closer to 1":
        ma, mb = stats.get("a_mean"), stats.get("b_mean")
        if ma is None or mb is None or (ma - 1) * (mb - 1) < 0:
            return f"{what}: {a} is {side} than {b} ({ci}); the two lie on opposite sides of 1."
        verdict = "better" if abs(ma - 1) < abs(mb - 1) else "worse"
        return f"{what}: {a} is {verdict} than {b} ({side}, closer to 1 is better; {ci})."
    if better is None:
        return f"{what}: {a} is {side} than {b} ({ci})."
    verdict = "better" if side == better else "worse"
    return f"{what}: {a} is {verdict} than {b} ({side}; {ci})."


def _units(metric: str) -> dict:
    """difference_sentence's scale and unit: percentage points for accuracy and win/lose rates."""
    return {"scale": 100.0, "unit": " points"} if metric in PERCENT_METRICS else {}


def metric_label(metric: str) -> str:
    ts = metric.startswith("ts_")
    base = metric[3:] if ts else metric
    m = re.fullmatch(r"(ece|truth_ece)_(\d+)", base)
    if m:
        base = f"ECE{m.group(2)}" if m.group(1) == "ece" else f"ECE{m.group(2)} vs true probabilities"
    else:
        base = {
            "accuracy": "accuracy",
            "brier": "Brier",
            "nll": "NLL",
            "truth_mae": "MAE vs true prob.",
            "gold_mae": "MAE vs gold prob.",
            "temperature": "temperature T",
            "gold_reward": "gold reward",
            "perplexity": "perplexity",
            "win_rate": "win rate",
            "lose_rate": "lose rate",
            "win_minus_lose": "win - lose",
            "gold_diff": "gold reward a - b",
        }.get(base, base)
    return f"{base} after temperature scaling" if ts else base
