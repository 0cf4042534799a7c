"""calibration/table.md: the paper's Table 2 and Table 1 layouts, before and after temperature scaling, the
errors against the truth on the synthetic benchmark, the bootstrap intervals and the diversity matrix.

`render_table` reads the metrics the stage computed (`analysis`); every table is built by
`pipeline.tables.markdown_table`. Imports the leaves, the calibration config and `temperature` (its warning).
"""

from __future__ import annotations

import math

from pipeline.calibration.config import CalibrationConfig
from pipeline.calibration.temperature import few_pairs_warning
from pipeline.tables import markdown_table


def _f(x, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _section(title: str, header: list, rows: list, *, before: tuple = (), after: tuple = ()) -> list[str]:
    """`## title`, a blank line, the lines `before`, the table, a blank line and the lines `after`."""
    return [f"## {title}", "", *before, *markdown_table(header, rows), "", *after]


def _scaled(entry: dict, key: str | None) -> dict:
    """An entry of metrics.json, or its `key` block (e.g. "temperature_scaled")."""
    return entry[key] if key else entry


def _accuracy_table(metrics: dict, sources: list[str], ece: str, key: str | None, title: str) -> list[str]:
    """Table 2 layout: accuracy (%) per source, the average accuracy and the average ECE, one row per RM."""
    rows = []
    for rm, m in metrics.items():
        avg = _scaled(m["all_average"], key)
        rows.append(
            [rm, *(_pct(_scaled(m[s], key)["accuracy"]) for s in sources), _pct(avg["accuracy"]), _f(avg[ece])]
        )
    return _section(title, ["RM", *sources, "Avg. acc", "ECE"], rows)


def _ece_table(metrics: dict, sources: list[str], ece: str, key: str | None, title: str) -> list[str]:
    rows = [
        [rm, *(_f(_scaled(m[s], key)[ece]) for s in sources), _f(_scaled(m["all_average"], key)[ece])]
        for rm, m in metrics.items()
    ]
    return _section(title, ["RM", *sources, "Avg."], rows)


def _hh_table(metrics: dict, hh: list[str], ece: str, scaled: bool) -> list[str]:
    """Table 1 layout: the Helpful & Harmless average accuracy and ECE (and ECE after temperature scaling)."""
    header = ["RM", "H&H acc", "H&H ECE"] + (["H&H ECE (temperature-scaled)"] if scaled else [])
    rows = []
    for rm, m in metrics.items():
        a = m["hh_average"]
        rows.append([rm, _pct(a["accuracy"]), _f(a[ece])] + ([_f(a["temperature_scaled"][ece])] if scaled else []))
    return _section(f"Table 1 layout: Helpful & Harmless average ({', '.join(hh)})", header, rows)


def _temperature_tables(
    metrics: dict, temperatures: dict, sources: list[str], ece: str, h: int, fits: dict | None = None
) -> list[str]:
    """The fitted temperatures with the all-source ECE, NLL and Brier before and after (and the validation pairs
    each was fitted on, with a warning under `temperature.MIN_PAIRS`), then the Table 2 and per-source ECE
    layouts after temperature scaling."""
    fits = fits or {}
    counts = sorted({f["n_pairs"] for f in fits.values() if isinstance(f, dict) and "n_pairs" in f})
    on = f"the {counts[0]} validation pairs" if len(counts) == 1 else "the validation pairs"
    warn = [f"**Warning:** {w}." for n in counts if (w := few_pairs_warning(n))]
    rows = []
    for rm, m in metrics.items():
        a = m["all_average"]
        b = a["temperature_scaled"]
        rows.append(
            [rm, _f(temperatures[rm], 3), _f(a[ece]), _f(b[ece]), _f(a["nll"]), _f(b["nll"])]
            + [_f(a["brier"]), _f(b["brier"])]
        )
    header = ["RM", "T", "ECE before", "ECE after", "NLL before", "NLL after", "Brier before", "Brier after"]
    note = (
        "Accuracy does not change (dividing rewards by T > 0 keeps every sign).",
        "",
        *warn,
        *([""] if warn else []),
    )
    return (
        _section(f"Temperature scaling (T fitted on {on} of all sources)", header, rows, before=note)
        + _accuracy_table(metrics, sources, ece, "temperature_scaled", "Table 2 layout after temperature scaling")
        + _ece_table(metrics, sources, ece, "temperature_scaled", f"ECE (M={h}) per source after temperature scaling")
    )


def _truth_table(metrics: dict, sources: list[str], h: int) -> list[str]:
    """Synthetic benchmark: the error of each RM's probabilities against the true and the gold ones."""
    key = f"ece_vs_truth_{h}"
    rows = []
    for rm, m in metrics.items():
        a = m["all_average"]
        rows.append(
            [rm, *(_f(m[s].get("truth", {}).get("prob_mae")) for s in sources)]
            + [_f(a.get("truth", {}).get("prob_mae")), _f(a.get("truth", {}).get(key))]
            + [_f(a.get("truth_gold", {}).get("prob_mae"))]
        )
    note = (
        "`truth`: each pair's true preference probability under its source's own utility (what the "
        "label was drawn from); `gold`: the probability under the shared gold reward r*. MAE = mean "
        "|p_RM - p_true|; ECE vs truth bins p_RM and compares with the mean true probability.",
        "",
    )
    header = ["RM", *sources, "Avg. MAE", "Avg. ECE vs truth", "Avg. MAE vs gold"]
    after = ("(per-source cells: MAE vs the true probability)", "")
    return _section("Against the truth (synthetic benchmark)", header, rows, before=note, after=after)


def _interval_table(metrics: dict, sources: list[str], ece: str, n_samples: int) -> list[str]:
    """The percentile bootstrap intervals of accuracy and ECE, with ECE's point estimate and the bootstrap
    estimate of its upward bias beside its interval (see metrics.bootstrap_intervals)."""
    rows = []
    for rm, m in metrics.items():
        for s in sources:
            iv = m[s]["intervals"]
            acc, err, bias = iv["accuracy"], iv[ece], iv.get(f"{ece}_bias")
            bias_cell = "-" if bias is None else f"{bias:+.4f}"
            rows.append(
                [rm, s, f"{_pct(acc[0])} - {_pct(acc[1])}", _f(m[s].get(ece)), f"{_f(err[0])} - {_f(err[1])}"]
                + [bias_cell]
            )
    title = f"95% percentile bootstrap intervals ({n_samples} resamples of the test pairs)"
    note = (
        "Percentile intervals: the 2.5th to 97.5th percentile of the metric over resamples of the test pairs. ECE is "
        "biased upward on a finite sample (noise in each bin's mean only adds to the gap) and a resample more so, so "
        "the resampled ECEs sit above the estimate: the ECE interval says how much ECE moves between test samples of "
        "this size, not where the true calibration error lies, and may start at the estimate. The last column is the "
        "bootstrap estimate of that bias (mean over resamples minus the estimate; the estimate minus it is a "
        "bias-corrected ECE). Differences between RMs are paired (comparisons.md), and the bias largely cancels there.",
        "",
    )
    header = ["RM", "source", "accuracy (%)", "ECE", "ECE interval", "ECE bias (resamples - estimate)"]
    return _section(title, header, rows, before=note)


def _diversity_tables(diversity: dict, ece: str) -> list[str]:
    """The cross matrix of the single-source RMs (row: trained on, column: tested on), accuracy then ECE."""
    lines = []
    for key, fmt in (("accuracy", _pct), (ece, _f)):
        rows = [[t, *(fmt(v) for v in row)] for t, row in zip(diversity["trained_on"], diversity[key])]
        title = f"Diversity: {key} of single-source RMs (row: trained on, column: tested on)"
        lines += _section(title, ["trained on \\ tested on", *diversity["tested_on"]], rows)
    return lines


def render_table(
    metrics: dict,
    temperatures: dict,
    sources: list[str],
    hh: list[str],
    cfg: CalibrationConfig,
    diversity: dict | None,
    fits: dict | None = None,
) -> str:
    """calibration/table.md: the paper's Table 2 and Table 1 layouts, before and after temperature scaling."""
    h = cfg.headline_bins
    ece = f"ece_{h}"
    lines = ["# Reward-model calibration", ""]
    lines += [
        f"ECE: the paper's symmetrized ECE with {h} {cfg.strategy} bins (lower is better); accuracy in %, "
        "reward ties count half. Averages are unweighted means over sources.",
        "",
    ]
    lines += _accuracy_table(
        metrics, sources, ece, None, "Table 2 layout: test accuracy (%) per source, average, and average ECE"
    )
    lines += _ece_table(metrics, sources, ece, None, f"ECE (M={h}) per source")
    if hh:
        lines += _hh_table(metrics, hh, ece, bool(temperatures))
    if temperatures:
        lines += _temperature_tables(metrics, temperatures, sources, ece, h, fits)
    if any("truth" in metrics[rm][s] for rm in metrics for s in sources):
        lines += _truth_table(metrics, sources, h)
    if cfg.bootstrap_samples:
        lines += _interval_table(metrics, sources, ece, cfg.bootstrap_samples)
    if diversity:
        lines += _diversity_tables(diversity, ece)
    return "\n".join(lines)
