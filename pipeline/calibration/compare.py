"""Paired comparisons of two reward models with bootstrap intervals, and the sentences that report them.

Two RMs scored on the SAME test pairs are compared by the paired bootstrap: every resample draws pair
indices with replacement once and evaluates BOTH RMs on those same pairs, so the variation the two share
(hard pairs, easy pairs) cancels in the difference a - b. For an average over sources (all sources,
Helpful & Harmless) each source is resampled within itself (its own number of pairs), the metric is
computed per source and the sources are averaged, exactly as the point estimate (an unweighted mean of
per-source metrics) is computed.

Every metric compared here is a function of per-pair terms summed over the (re)sampled pairs, so a
resample is a vector of pair counts w (how often each pair was drawn) and a metric a weighted sum
(`pair_terms`, `weighted_metrics`): accuracy = w.correct / n, Brier = w.(1 - p)^2 / n, NLL = w.softplus(-d) / n,
the symmetrized ECE with uniform bins = sum over bins |w.G[:, bin]| / 2n (G holds each pair's label minus
probability in the bins of p and of 1 - p), prob_mae vs a true probability q = w.|p - q| / n. Quantile
bins depend on the sample, so quantile ECE is recomputed per resample. Temperatures are the ones fitted
on the validation pairs and are held fixed (the bootstrap measures test-set noise only).

Draws (reproducible, and what the brute-force test replays): source number j of the comparison uses
`numpy.random.default_rng([seed, j])` and draws one row `rng.integers(0, n_j, n_j)` per resample.

The interval is the percentile interval of the B resampled differences; the two-sided p-value is
min(1, 2 min(P*(diff <= 0), P*(diff >= 0))), so that (up to interpolation) the 95% interval excludes 0
exactly when p < 0.05. Because the two can disagree at the boundary (an interval that just excludes 0 with
p = 0.050), the one significance rule of the project (`is_significant`, which lives in pipeline.stats and is
also used by pipeline.sweep and scripts/study_report.py) asks for both: the interval excludes 0 (an end
exactly at 0 does not) AND p < 0.05 strictly. Only such a difference is reported as real ("lower by ...").

comparisons.md labels every metric with its better direction (`direction`: lower is better for ECE, Brier,
NLL and the MAEs; higher for accuracy; closer to 1 for a temperature), gives each cell's p-value, and ends
with one paragraph (`significance_paragraph`) that names every significant difference in the tables.

Imports the calibration package's `metrics` and the leaves `pipeline.stats` and `pipeline.tables` only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.special import expit

from pipeline.calibration import metrics as M
from pipeline.stats import ALPHA, is_significant
from pipeline.tables import markdown_table


LEVEL = 0.95
_VS = re.compile(r"^\s*(\S+)\s+vs\.?\s+(\S+)\s*$")
# Row budget of one resample chunk (pair counts are a chunk x n matrix).
_CHUNK_CELLS = 2_000_000


# --------------------------------------------------------------------------------------------------
# Comparisons to run
# --------------------------------------------------------------------------------------------------
def parse_comparison(
    text: str, key: str = "calibration.compare", names: str = "two different RM names"
) -> tuple[str, str]:
    """'more vs multitask' -> ('more', 'multitask'); one clear error for anything else, naming the recipe `key`
    the comparison came from and what its two sides may be (`names`)."""
    m = _VS.match(str(text))
    if not m or m.group(1) == m.group(2):
        raise ValueError(
            f"{key}: {text!r} is not a comparison; write '<a> vs <b>' with {names}, e.g. 'more vs multitask'"
        )
    return m.group(1), m.group(2)


def default_comparisons(rms: Sequence[str]) -> list[str]:
    """`more vs multitask` when both exist, plus `more vs uniform` and `multitask vs uniform` when they exist."""
    have = set(rms)
    out = ["more vs multitask"] if {"more", "multitask"} <= have else []
    if "uniform" in have:
        out += [f"{a} vs uniform" for a in ("more", "multitask") if a in have]
    return out


def resolve_comparisons(compare: Sequence[str] | None, rms: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{"<a> vs <b>": (a, b)}; an RM name that is not evaluated in this run fails with the list of valid ones."""
    texts = default_comparisons(rms) if compare is None else list(compare)
    out = {}
    for text in texts:
        a, b = parse_comparison(text)
        unknown = [n for n in (a, b) if n not in rms]
        if unknown:
            raise ValueError(
                f"calibration.compare: {text!r} names {', '.join(repr(n) for n in unknown)}, which this run does not "
                f"evaluate; the RMs evaluated here are: {', '.join(rms) or 'none'}"
            )
        out[f"{a} vs {b}"] = (a, b)
    return out


def metric_keys(headline_bins: int, temperature_scaling: bool, truth: bool = False, gold: bool = False) -> list[str]:
    """The compared metrics, as paths into metrics.json.

    'temperature_scaled/ece_10' stands for entry['temperature_scaled']['ece_10'].
    """
    ece = f"ece_{headline_bins}"
    keys = [ece, "accuracy", "brier", "nll"]
    if temperature_scaling:  # accuracy does not change under a temperature T > 0
        keys += [f"temperature_scaled/{k}" for k in (ece, "brier", "nll")]
    if truth:
        keys.append("truth/prob_mae")
    if gold:
        keys.append("truth_gold/prob_mae")
    return keys


# --------------------------------------------------------------------------------------------------
# Per-pair terms and weighted metrics
# --------------------------------------------------------------------------------------------------
def pair_terms(
    rc, rr, *, n_bins: int = 10, strategy: str = "uniform", temperature: float = 1.0, true_prob=None, gold_prob=None
) -> dict:
    """Per-pair additive terms of every compared metric of one RM on one source (see the module docstring)."""
    d = M.reward_margins(rc, rr) / float(temperature)
    p = expit(d)
    n = d.size
    terms = {
        "n": n,
        "n_bins": int(n_bins),
        "strategy": strategy,
        "p": p,
        "correct": np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)),
        "brier": (1.0 - p) ** 2,
        "nll": np.logaddexp(0.0, -d),
    }
    if strategy == "uniform":
        edges = M.bin_edges(p, n_bins, "uniform")
        g = np.zeros((n, n_bins))
        rows = np.arange(n)
        np.add.at(g, (rows, M.bin_ids(p, edges)), 1.0 - p)  # the pair as (p, label 1)
        np.add.at(g, (rows, M.bin_ids(1.0 - p, edges)), -(1.0 - p))  # and as (1 - p, label 0)
        terms["ece_g"] = g
    if true_prob is not None:
        terms["truth_mae"] = np.abs(p - M.to_numpy(true_prob))
    if gold_prob is not None:
        terms["gold_mae"] = np.abs(p - M.to_numpy(gold_prob))
    return terms


def weighted_metrics(terms: dict, counts: np.ndarray, idx: np.ndarray | None = None) -> dict:
    """Each metric of `pair_terms` for every row of `counts` (k x n pair counts, rows summing to n).

    `idx` (k x n drawn indices) is needed only for quantile-binned ECE, recomputed per resample.
    """
    w = np.atleast_2d(counts).astype(np.float64)
    total = w.sum(axis=1)
    out = {
        "accuracy": w @ terms["correct"] / total,
        "brier": w @ terms["brier"] / total,
        "nll": w @ terms["nll"] / total,
    }
    if "ece_g" in terms:
        out["ece"] = np.abs(w @ terms["ece_g"]).sum(axis=1) / (2.0 * total)
    else:
        if idx is None:
            idx = np.atleast_2d(np.arange(terms["n"]))
        p = terms["p"]
        out["ece"] = np.array(
            [
                M.binned_calibration(*M.symmetrize(p[row]), terms["n_bins"], terms["strategy"])["ece"]
                for row in np.atleast_2d(idx)
            ]
        )
    if "truth_mae" in terms:
        out["truth/prob_mae"] = w @ terms["truth_mae"] / total
    if "gold_mae" in terms:
        out["truth_gold/prob_mae"] = w @ terms["gold_mae"] / total
    return out


def _named(values: dict, headline_bins: int, prefix: str = "") -> dict:
    """weighted_metrics output under metrics.json key names."""
    rename = {"ece": f"ece_{headline_bins}"}
    return {
        (k if "/" in k else prefix + rename.get(k, k)): v
        for k, v in values.items()
        if not (prefix and (k == "accuracy" or "/" in k))
    }


def resample_rows(n: int, n_samples: int, seed: int, j: int):
    """Yield (idx, counts) chunks: idx (k x n) drawn pair indices, counts (k x n) how often each pair was drawn."""
    rng = np.random.default_rng([int(seed), int(j)])
    step = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_samples, step):
        k = min(step, n_samples - start)
        idx = np.stack([rng.integers(0, n, n) for _ in range(k)])
        counts = np.bincount((idx + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        yield idx, counts


# --------------------------------------------------------------------------------------------------
# The paired bootstrap
# --------------------------------------------------------------------------------------------------
def _rm_values(terms_list: list[dict], counts, idx, headline_bins: int) -> dict:
    out = _named(weighted_metrics(terms_list[0], counts, idx), headline_bins)
    if len(terms_list) > 1:
        out.update(_named(weighted_metrics(terms_list[1], counts, idx), headline_bins, prefix="temperature_scaled/"))
    return out


def summarize_differences(a: float, b: float, diffs: np.ndarray | None, level: float = LEVEL) -> dict:
    """{"a", "b", "diff", "ci95", "p_value"} from the point values and the resampled differences a* - b*."""
    out = {"a": float(a), "b": float(b), "diff": float(a - b), "ci95": None, "p_value": None}
    if diffs is not None and len(diffs):
        tail = (1.0 - level) / 2 * 100
        lo, hi = np.percentile(diffs, [tail, 100 - tail])
        out["ci95"] = [float(lo), float(hi)]
        out["p_value"] = float(min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))))
    return out


def paired_bootstrap(
    a: dict,
    b: dict,
    *,
    sources: Sequence[str],
    hh: Sequence[str] = (),
    headline_bins: int = 10,
    strategy: str = "uniform",
    temperatures: tuple[float, float] | None = None,
    true_prob: dict | None = None,
    gold_prob: dict | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """Paired differences a - b per source and for the all-source and Helpful & Harmless averages.

    `a`, `b`: {source: (r_chosen, r_rejected)} of the two RMs on the same test pairs (same order).
    `temperatures`: (T_a, T_b) fitted on validation; adds the temperature-scaled metrics. `true_prob`,
    `gold_prob`: {source: probabilities} (synthetic benchmark) add `truth/prob_mae`, `truth_gold/prob_mae`.
    Returns {source | "all_average" | "hh_average": {metric: {"a", "b", "diff", "ci95", "p_value"}}}.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("paired_bootstrap: no sources to compare")
    point: dict = {}
    boot: dict = {}
    for j, s in enumerate(sources):
        if len(a[s][0]) != len(b[s][0]):
            raise ValueError(
                f"paired_bootstrap: source {s!r} has {len(a[s][0])} pairs for one RM and "
                f"{len(b[s][0])} for the other; a paired comparison needs the same test pairs"
            )
        kw = dict(
            n_bins=headline_bins,
            strategy=strategy,
            true_prob=(true_prob or {}).get(s),
            gold_prob=(gold_prob or {}).get(s),
        )
        ta, tb = [pair_terms(*a[s], **kw)], [pair_terms(*b[s], **kw)]
        if temperatures:
            ta.append(pair_terms(*a[s], temperature=temperatures[0], **kw))
            tb.append(pair_terms(*b[s], temperature=temperatures[1], **kw))
        n = ta[0]["n"]
        ones = np.ones((1, n))
        va, vb = _rm_values(ta, ones, None, headline_bins), _rm_values(tb, ones, None, headline_bins)
        point[s] = {k: (float(va[k][0]), float(vb[k][0])) for k in va}
        if n_samples:
            chunks = {k: [] for k in va}
            for idx, counts in resample_rows(n, n_samples, seed, j):
                ra, rb = _rm_values(ta, counts, idx, headline_bins), _rm_values(tb, counts, idx, headline_bins)
                for k in chunks:
                    chunks[k].append(ra[k] - rb[k])
            boot[s] = {k: np.concatenate(v) for k, v in chunks.items()}
    out = {}
    for s in sources:
        out[s] = {k: summarize_differences(*point[s][k], boot[s][k] if n_samples else None, level) for k in point[s]}
    groups = [("all_average", sources)] + ([("hh_average", list(hh))] if hh else [])
    for group, members in groups:
        keys = [k for k in point[members[0]] if all(k in point[m] for m in members)]
        out[group] = {}
        for k in keys:
            pa = float(np.mean([point[m][k][0] for m in members]))
            pb = float(np.mean([point[m][k][1] for m in members]))
            diffs = np.mean([boot[m][k] for m in members], axis=0) if n_samples else None
            out[group][k] = summarize_differences(pa, pb, diffs, level)
    return out


def bootstrap_win_lose(counts: dict, *, n_samples: int = 2000, seed: int = 0, level: float = LEVEL) -> dict | None:
    """Win rate minus lose rate of one policy over another with a bootstrap interval over the prompts.

    Each valid prompt's outcome is +1 (win), 0 (tie) or -1 (lose); the statistic is their mean (= win - lose
    fraction). Resamples replay `resample_rows` over the outcomes laid out as wins, ties, losses.
    Returns {"diff", "ci95", "p_value", "n"} or None when there is no valid verdict.
    """
    w, t, lo = (int(counts.get(k, 0)) for k in ("win", "tie", "lose"))
    n = w + t + lo
    if n == 0:
        return None
    x = np.concatenate([np.ones(w), np.zeros(t), -np.ones(lo)])
    diffs = np.concatenate([c @ x / n for _, c in resample_rows(n, n_samples, seed, 0)]) if n_samples else None
    s = summarize_differences(float(x.mean()), 0.0, diffs, level)
    return {"diff": s["diff"], "ci95": s["ci95"], "p_value": s["p_value"], "n": n}


# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------
def significant(entry: dict) -> bool:
    """`is_significant` of a comparisons.json entry {"ci95": [lo, hi], "p_value"} (no interval: never)."""
    ci = entry.get("ci95") or (None, None)
    return is_significant(ci[0], ci[1], entry.get("p_value")) is True


HIGHER_IS_BETTER = ("accuracy", "gold_reward", "win_rate", "win_minus_lose")
LOWER_IS_BETTER_PREFIXES = ("ece", "brier", "nll", "truth", "gold_", "prob_mae", "perplexity", "lose_rate")
DIRECTION_TEXT = {
    "lower": "lower is better",
    "higher": "higher is better",
    "closer to 1": "closer to 1 is better",
    None: "no better direction",
}


def direction(metric: str) -> str | None:
    """Which value of a metric is better: 'lower', 'higher', 'closer to 1' (a temperature) or None.

    Takes comparisons.json keys ('temperature_scaled/ece_10', 'truth/prob_mae') and pipeline.sweep's names
    ('ts_ece_10', 'truth_mae', 'temperature')."""
    base = metric.split("/", 1)[1] if metric.startswith("temperature_scaled/") else metric
    base = base[3:] if base.startswith("ts_") else base
    if base in HIGHER_IS_BETTER:
        return "higher"
    if base == "temperature":
        return "closer to 1"
    if base.startswith(LOWER_IS_BETTER_PREFIXES):
        return "lower"
    return None


def p_text(p: float | None) -> str:
    """'p < 0.001', 'p = 0.024' or '' (no p-value)."""
    if p is None:
        return ""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def significance_paragraph(findings: Sequence[str], n_tested: int, what: str = "difference") -> str:
    """One paragraph naming EVERY significant difference (`findings`, one phrase each) out of `n_tested`."""
    rule = f"interval excludes 0 and p < {ALPHA:g}"
    chance = (
        f" With {n_tested} tests, about {ALPHA * n_tested:.0f} would pass this rule by chance alone even with no "
        "real difference, so read isolated ones with care."
        if ALPHA * n_tested >= 1
        else ""
    )
    if not findings:
        return (
            f"Summary: none of the {n_tested} {what}s tested is significant ({rule}); none of them can be told "
            "from noise here."
        )
    return (
        f"Summary: {len(findings)} of the {n_tested} {what}s tested are significant ({rule}): "
        + "; ".join(findings)
        + f". Every other {what} is not significant."
        + chance
    )


def _num(x: float, digits: int, signed: bool) -> str:
    if signed:
        return f"{x:+.{digits}f}"
    return f"{x:.{digits}f}"


def difference_sentence(
    a_name: str,
    b_name: str,
    what: str,
    entry: dict,
    *,
    lower_is_better: bool = True,
    scale: float = 1.0,
    digits: int = 4,
    unit: str = "",
) -> str:
    """One sentence about a - b that calls a difference real only when `significant` (interval excludes 0, p < 0.05).

    Significant: "MORE's ECE (M=10), all sources is lower than MultiTask's by 0.0180 (95% CI 0.0100 to 0.0260;
    p = 0.002): MORE is better here." Otherwise: "no significant difference between MORE and MultiTask in
    ECE (M=10), all sources (difference +0.0006, 95% CI -0.0110 to +0.0120)."
    """
    d = entry["diff"] * scale
    ci = entry.get("ci95")
    if not ci:
        return (
            f"{what}: {a_name} {_num(entry['a'] * scale, digits, False)}{unit} vs {b_name} "
            f"{_num(entry['b'] * scale, digits, False)}{unit} (difference {_num(d, digits, True)}{unit}; no "
            "bootstrap interval was computed, so no verdict)."
        )
    lo, hi = ci[0] * scale, ci[1] * scale
    p = entry.get("p_value")
    p_txt = "" if p is None else "; " + p_text(p)
    if not significant(entry):
        return (
            f"{what}: no significant difference between {a_name} and {b_name} (difference "
            f"{_num(d, digits, True)}{unit}, 95% CI {_num(lo, digits, True)} to {_num(hi, digits, True)}{p_txt})."
        )
    lower = d < 0
    a_better = lower == lower_is_better
    mag_lo, mag_hi = (-hi, -lo) if lower else (lo, hi)
    return (
        f"{what}: {a_name}'s is {'lower' if lower else 'higher'} than {b_name}'s by {_num(abs(d), digits, False)}"
        f"{unit} (95% CI {_num(mag_lo, digits, False)} to {_num(mag_hi, digits, False)}{p_txt}): "
        f"{a_name if a_better else b_name} is better here."
    )


def win_lose_sentence(label: str, entry: dict, stats: dict | None) -> str:
    """Win/tie/lose of the first policy, called a win (or a loss) only when win - lose is `significant`."""
    w, t, lo = (entry.get(k) for k in ("win", "tie", "lose"))
    if None in (w, t, lo):
        return f"{label}: no verdicts."
    scale = 100.0 if max(w, t, lo) <= 1.0 else 1.0
    n = entry.get("n")
    head = (
        f"{label}: win {w * scale:.0f}% / tie {t * scale:.0f}% / lose {lo * scale:.0f}%"
        f"{f' of {n} prompts' if n else ''}"
    )
    if stats is None or not stats.get("ci95"):
        return f"{head}; win - lose {(w - lo) * scale:+.1f} points (no interval, so no verdict)."
    d = 100 * stats["diff"]
    ci_lo, ci_hi = (100 * v for v in stats["ci95"])
    iv = f"win - lose {d:+.1f} points, 95% CI {ci_lo:+.1f} to {ci_hi:+.1f}"
    if not significant(stats):
        return f"{head}; no significant difference between the two policies ({iv})."
    verdict = "wins more often than it loses" if d > 0 else "loses more often than it wins"
    return f"{head}; the first policy {verdict} ({iv})."


def _fmt_cell(e: dict, scale: float, digits: int) -> str:
    if e["ci95"] is None:
        return f"{e['diff'] * scale:+.{digits}f}"
    star = " *" if significant(e) else ""
    lo, hi = (v * scale for v in e["ci95"])
    p = e.get("p_value")
    p_cell = "" if p is None else f" {p_text(p)}"
    return f"{e['diff'] * scale:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{p_cell}{star}"


def _scale(key: str) -> tuple[float, int]:
    """(scale, digits) of a metric in the tables: accuracy in percentage points, as in report.md."""
    return (100.0, 2) if key == "accuracy" else (1.0, 4)


def _finding(a: str, b: str, group: str, key: str, e: dict) -> str:
    """'brier (all_average): more higher by 0.0180 [0.0020, 0.0340], p = 0.024, multitask better'."""
    scale, digits = _scale(key)
    d, (lo, hi) = e["diff"] * scale, (v * scale for v in e["ci95"])
    side = "lower" if d < 0 else "higher"
    mag = f"{abs(d):.{digits}f} [{min(abs(lo), abs(hi)):.{digits}f}, {max(abs(lo), abs(hi)):.{digits}f}]"
    better = direction(key)
    verdict = f", {a if side == better else b} better" if better in ("lower", "higher") else ""
    unit = " points" if key == "accuracy" else ""
    return f"{_label(key)} ({group}): {a} {side} by {mag}{unit}, {p_text(e.get('p_value'))}{verdict}"


def _label(key: str) -> str:
    return key.replace("temperature_scaled/", "ts/")


def render_comparisons(comparisons: dict, n_samples: int) -> str:
    """calibration/comparisons.md: one table per comparison, rows = sources and averages, cells = a - b [95% CI]
    and p; each column says which direction is better; a closing paragraph names every significant cell."""
    lines = [
        "# Paired comparisons",
        "",
        f"Each cell is the difference a - b with its 95% paired bootstrap interval and two-sided p-value "
        f"({n_samples} resamples of the same test pairs for both RMs; averages resample within each source). "
        f"`*` marks a significant difference: its interval excludes 0 AND p < {ALPHA:g}; only those are "
        "differences this run can tell from noise. Under each metric: which direction is better. Accuracy in "
        "percentage points; `ts/` = after temperature scaling.",
        "",
    ]
    for label, groups in comparisons.items():
        keys = list(dict.fromkeys(k for by_metric in groups.values() for k in by_metric))
        labels = [_label(k) for k in keys]
        rows = [
            [group, *(_fmt_cell(by_metric[k], *_scale(k)) if k in by_metric else "-" for k in keys)]
            for group, by_metric in groups.items()
        ]
        table = markdown_table(
            ["", *labels], rows, subheader=["*better*", *(DIRECTION_TEXT[direction(k)] for k in keys)]
        )
        corner = "| | " + " | ".join(labels) + " |"  # the header with its empty corner cell written '| |'
        lines += [f"## {label}", "", corner, *table[1:], ""]
    lines += [comparisons_paragraph(comparisons), ""]
    return "\n".join(lines)


def comparisons_paragraph(comparisons: dict) -> str:
    """The closing paragraph of comparisons.md: every significant cell of comparisons.json, named."""
    findings, n_tested = [], 0
    for label, groups in comparisons.items():
        a, b = parse_comparison(label)
        for group, by_metric in groups.items():
            for k, e in by_metric.items():
                if e.get("ci95") is not None:
                    n_tested += 1
                    if significant(e):
                        findings.append(f"{label}, " + _finding(a, b, group, k, e))
    return significance_paragraph(findings, n_tested)
