"""D/summary.md: a sweep's summary as readable tables (headline metrics, each with its better direction;
accuracy in %, as in report.md; a warning where fewer than 3 seeds made the intervals; every source in
summary.json), ending with a paragraph that names every significant difference (`summary_paragraph`).

Imports: the leaves pipeline.stats and pipeline.tables, pipeline.calibration.compare's sentence helpers and
pipeline.sweep.metrics.
"""

from __future__ import annotations

import re

from pipeline.calibration.compare import DIRECTION_TEXT, direction, p_text, significance_paragraph
from pipeline.stats import ALPHA, t_test_p
from pipeline.stats import is_significant as significance_rule
from pipeline.sweep.metrics import MIN_SEEDS, PAIRS, PERCENT_METRICS, is_significant, judge, metric_label
from pipeline.tables import markdown_table, rm_label


VERDICTS = {True: "significant", False: "no significant difference", None: "too few seeds"}


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cell(stats: dict | None, metric: str = "") -> str:
    """'0.0512 [0.0401, 0.0623]' (mean and interval); '0.0512 (n=1)' without an interval. Accuracy and
    win/lose rates in percent (`PERCENT_METRICS`); an interval clipped to the metric's range is marked
    with a dagger, one from fewer than MIN_SEEDS seeds with (n=2), one with a seed's value left out (not a
    finite number in the metric's range) with (n=1; seed 1 left out)."""
    left = (stats or {}).get("left_out")
    out = f"; seed {', '.join(left)} left out" if left else ""
    if not stats or stats.get("mean") is None:
        return f"- ({out[2:]})" if left else "-"
    scale, digits = (100.0, 2) if metric in PERCENT_METRICS else (1.0, 4)

    def f(x):
        return _fmt(x * scale, digits)

    if stats.get("low") is None:
        return f"{f(stats['mean'])} (n={stats['n']}{out})"
    mark = " †" if stats.get("clipped") else ""
    few = f" (n={stats['n']}{out})" if stats.get("n", 0) < MIN_SEEDS or left else ""
    return f"{f(stats['mean'])} [{f(stats['low'])}, {f(stats['high'])}]{mark}{few}"


def seed_warning(n: int) -> str:
    """The warning printed beside intervals from fewer than MIN_SEEDS seeds (empty otherwise)."""
    if n >= MIN_SEEDS or n < 2:
        return ""
    from scipy.stats import t as student_t

    t = float(student_t.ppf(0.975, n - 1))
    return (
        f"Warning: {n} seeds. A 95% t-interval from {n} seeds uses t = {t:.1f} and is very wide (intervals of "
        f"bounded metrics are clipped to their range, marked †); run at least {MIN_SEEDS} seeds before "
        "reading anything into these intervals."
    )


def _index(rows: list[dict]) -> dict:
    return {(r["section"], r.get("rm", r.get("a")), r["scope"], r["metric"]): r for r in rows}


def headline_metrics(metrics: list[dict]) -> list[str]:
    present = {r["metric"] for r in metrics if r["section"] == "calibration"}
    ece = sorted(m for m in present if re.fullmatch(r"ece_\d+", m))
    order = [
        "accuracy",
        *ece[:1],
        *[f"ts_{m}" for m in ece[:1]],
        "temperature",
        "brier",
        "nll",
        "truth_mae",
        "ts_truth_mae",
    ]
    return [m for m in order if m in present]


def key_metrics(heads: list[str]) -> list[str]:
    """The metrics compared in the markdown's difference tables and sentences (all are in summary.json)."""
    return [m for m in heads if m in ("accuracy", "temperature", "truth_mae") or re.fullmatch(r"(ts_)?ece_\d+", m)]


def _rms(metrics: list[dict], section: str) -> list[str]:
    names = sorted({r["rm"] for r in metrics if r["section"] == section})
    known = [n for n in ("more", "multitask", "uniform") if n in names]
    return known + [n for n in names if n not in known]


def render_summary(summary: dict, plots: list[str] | None = None) -> str:
    conf = f"{100 * summary['confidence']:.0f}%"
    lines = _preamble(summary["sweep"], conf)
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    if len(summary["points"]) > 1:
        lines += overview(summary)
    for name, p in summary["points"].items():
        lines += _point_section(name, p, conf)
    lines += ["## Summary", "", summary_paragraph(summary), ""]
    return "\n".join(lines).rstrip() + "\n"


def _preamble(sweep: dict, conf: str) -> list[str]:
    """The title, the sweep's definition and how to read the tables."""
    return [
        "# Sweep summary",
        "",
        f"Recipe `{sweep['recipe']}`, seeds {', '.join(map(str, sweep['seeds']))}, stages "
        f"{sweep.get('stages') or 'the recipe default'}; overrides: "
        f"{' '.join(f'`{o}`' for o in sweep.get('overrides', [])) or 'none'}.",
        "Grid: " + ("; ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in sweep.get("grid", [])) or "none") + ".",
        "",
        f"Cells are `mean [{conf} t-interval over seeds]`; an interval that reached outside the metric's "
        "range (accuracy above 100%, a negative ECE or temperature) is clipped to the range and marked †. "
        "Accuracy and win/lose rates are in % (their differences in percentage points), as in report.md. "
        "Differences are seed-paired (the same seed's runs share their data draw), with the two-sided p-value "
        f"of the paired t-test. Rule: a difference is significant only when its {conf} interval excludes zero "
        f'AND p < {ALPHA:g}; otherwise it is "no significant difference". The *better* row says which '
        "direction is better. Every source and metric is in summary.json (fractions, as in metrics.json); the "
        "closing paragraph names every significant difference found there.",
        "",
    ]


def _point_section(name: str, p: dict, conf: str) -> list[str]:
    """One grid point: its values, the seeds with results, its tables and its differences in words."""
    lines = [f"## {name}", ""]
    if p["grid"]:
        lines += ["Grid values: " + ", ".join(f"`{k}={v}`" for k, v in p["grid"].items()), ""]
    missing = [f"{s}: {st}" for s, st in p["runs"].items() if st != "collected" and not st.startswith("left out")]
    lines += [
        f"Seeds with results: {p['n_runs']} of {len(p['runs'])}"
        + (f" (missing: {'; '.join(missing)})" if missing else "")
        + ".",
        "",
    ]
    lines += _left_out_lines(p)
    if seed_warning(p["n_runs"]):
        lines += [f"**{seed_warning(p['n_runs'])}**", ""]
    idx = _index(p["metrics"])
    heads = headline_metrics(p["metrics"])
    rms = _rms(p["metrics"], "calibration")
    sources = [
        s
        for s in dict.fromkeys(r["scope"] for r in p["metrics"] if r["section"] == "calibration")
        if s not in ("all_average", "hh_average")
    ]
    scopes = ["all_average"] + (["hh_average"] if set(sources) != {"helpful", "harmless"} else [])
    lines += _calibration_tables(idx, heads, rms, scopes)
    lines += _source_tables(idx, heads, rms, sources)
    lines += _policy_table(p["metrics"], idx)
    lines += _judgement_table(p["metrics"], idx)
    lines += _difference_table(p["differences"], key_metrics(heads), scopes, conf)
    return lines


def _left_out_lines(p: dict) -> list[str]:
    """Runs left out because they were made with other settings than the sweep's definition, and per-seed values
    left out of the means (not a number, not finite, outside the metric's range): each named, with why."""
    lines = []
    other = [f"seed {s}: {st[len('left out: ') :]}" for s, st in p["runs"].items() if st.startswith("left out")]
    if other:
        lines += [f"**Runs left out, not averaged with the others: {'; '.join(other)}.**", ""]
    bad = p.get("invalid") or []
    if bad:
        items = [
            f"seed {b['seed']}: {rm_label(b['rm'])}, {b['scope']}, {metric_label(b['metric'])} = {b['value']} ({b['why']})"
            for b in bad
        ]
        lines += [
            f"**Values left out of the means ({len(bad)}; each such mean uses the other seeds only, its n says how "
            f"many): {'; '.join(items[:20])}{' ...' if len(items) > 20 else ''}.**",
            "",
        ]
    return lines


def _calibration_tables(idx: dict, heads: list[str], rms: list[str], scopes: list[str]) -> list[str]:
    """The headline metrics of each RM, averaged over all sources (and over Helpful & Harmless)."""
    lines = []
    for scope, title in (("all_average", "all-source average"), ("hh_average", "Helpful & Harmless average")):
        if scope not in scopes or not any(("calibration", rm, scope, "accuracy") in idx for rm in rms):
            continue
        cols = [m for m in heads if m != "temperature" or scope == "all_average"]
        header = ["RM"] + [metric_label(m) + (" (%)" if m in PERCENT_METRICS else "") for m in cols]
        better = ["*better*"] + [DIRECTION_TEXT[direction(m)] for m in cols]
        rows = [[rm_label(rm)] + [cell(idx.get(("calibration", rm, scope, m)), m) for m in cols] for rm in rms]
        lines += [f"### Calibration, {title}", "", *markdown_table(header, rows, subheader=better), ""]
    return lines


def _source_tables(idx: dict, heads: list[str], rms: list[str], sources: list[str]) -> list[str]:
    """The headline ECE of each RM per source, before and after temperature scaling."""
    ece = next((m for m in heads if m.startswith("ece_")), None)
    if not (sources and ece):
        return []
    lines = []
    for m in (ece, f"ts_{ece}"):
        rows = [[rm_label(rm)] + [cell(idx.get(("calibration", rm, s, m)), m) for s in sources] for rm in rms]
        lines += [
            f"### {metric_label(m)} per source ({DIRECTION_TEXT[direction(m)]})",
            "",
            *markdown_table(["RM", *sources], rows),
            "",
        ]
    return lines


def _policy_table(metrics: list[dict], idx: dict) -> list[str]:
    """The gold reward of each aligned policy per prompt set. Written row by row (not `markdown_table`): a
    sweep whose policies have no gold reward keeps its one empty column, as before."""
    pols = _rms(metrics, "align")
    if not pols:
        return []
    sets = sorted({r["scope"] for r in metrics if r["section"] == "align" and r["metric"] == "gold_reward"})
    lines = [
        "### Aligned policies: gold reward (higher is better)",
        "",
        "| policy | " + " | ".join(sets) + " |",
        "|---" * (len(sets) + 1) + "|",
    ]
    for pol in pols:
        lines.append(f"| {pol} | " + " | ".join(cell(idx.get(("align", pol, s, "gold_reward"))) for s in sets) + " |")
    lines.append("")
    return lines


def _judgement_table(metrics: list[dict], idx: dict) -> list[str]:
    """The win and lose rates of each judged comparison over all prompt sets."""
    judged = sorted({r["rm"] for r in metrics if r["section"] == "judge"})
    if not judged:
        return []
    rates = ("win_rate", "lose_rate", "win_minus_lose")
    header = ["comparison", "win rate (%)", "lose rate (%)", "win - lose (points)"]
    rows = [[j] + [cell(idx.get(("judge", j, "all", m)), m) for m in rates] for j in judged]
    if any(("judge", j, "all", "gold_diff") in idx for j in judged):  # the gold judge: a - b, seed-paired
        header += ["gold reward a - b (seed-paired)", "p", "verdict"]
        for row, j in zip(rows, judged):
            row += _gold_diff_cells(idx.get(("judge", j, "all", "gold_diff")))
    return ["### Judgements (all prompt sets)", "", *markdown_table(header, rows), ""]


def _gold_diff_cells(stats: dict | None) -> list[str]:
    """[mean [interval], p, verdict] of a judged comparison's gold-reward difference over seeds (each seed's
    a - b on the same prompts, so the mean over seeds is seed-paired): higher is better for a."""
    if not stats or stats.get("mean") is None:
        return ["-", "", ""]
    p = t_test_p(stats["mean"], stats.get("sd"), stats.get("n", 0))
    sig = significance_rule(stats.get("low"), stats.get("high"), p)
    verdict = VERDICTS[sig] if not sig else "a better" if stats["mean"] > 0 else "b better"
    return [cell(stats, "gold_diff"), p_text(p), verdict]


def _difference_table(differences: list[dict], keys: list[str], scopes: list[str], conf: str) -> list[str]:
    """The seed-paired differences of the key metrics (and of the policies' gold reward) with their verdicts,
    then the same in words."""
    diffs = [
        d
        for d in differences
        if (d["section"] == "calibration" and d["scope"] in scopes and d["metric"] in keys)
        or (d["section"] == "align" and d["metric"] == "gold_reward" and d["scope"] == "all")
    ]
    diffs.sort(
        key=lambda d: (
            d["section"] != "calibration",
            d["scope"] != "all_average",
            keys.index(d["metric"]) if d["metric"] in keys else 0,
        )
    )
    if not diffs:
        return []
    header = ["difference", "metric", "better", "scope", f"mean [{conf} CI]", "p", "n", "verdict"]
    rows = [
        [
            f"{rm_label(d['a'])} - {rm_label(d['b'])}",
            metric_label(d["metric"]),
            DIRECTION_TEXT[direction(d["metric"])],
            d["scope"],
            cell(d, d["metric"]),
            p_text(d.get("p_value")) or "-",
            d["n"],
            VERDICTS[is_significant(d)],
        ]
        for d in diffs
    ]
    lines = ["### Seed-paired differences", "", *markdown_table(header, rows), "", "In words:", ""]
    lines += [f"- {d['sentence']}" for d in diffs if d["section"] == "align" or d["scope"] == "all_average"]
    lines.append("")
    return lines


def summary_paragraph(summary: dict) -> str:
    """One paragraph naming every significant seed-paired difference in summary.json (every point, scope and
    metric), by the project's rule."""
    findings, n_tested = [], 0
    for name, p in summary["points"].items():
        for d in p["differences"]:
            sig = is_significant(d)
            if sig is None:
                continue
            n_tested += 1
            if not sig:
                continue
            what = f"{metric_label(d['metric'])}, {d['scope']}"
            scale = 100.0 if d["metric"] in PERCENT_METRICS else 1.0
            better = direction(d["metric"])
            a, b = rm_label(d["a"]), rm_label(d["b"])
            _, judgement = judge(d)
            verdict = "" if judgement is None else f", {a if judgement == 'better' else b} better"
            if judgement and better == "closer to 1":
                verdict += " (closer to 1)"
            point = f"{name}: " if len(summary["points"]) > 1 else ""
            findings.append(
                f"{point}{a} - {b}, {what} {d['mean'] * scale:+.4g} [{d['low'] * scale:+.4g}, "
                f"{d['high'] * scale:+.4g}], {p_text(d.get('p_value'))}{verdict}"
            )
    return significance_paragraph(findings, n_tested, "seed-paired difference")


def overview(summary: dict) -> list[str]:
    """Across grid points: each RM's all-source ECE (before / after temperature scaling) and the paired
    differences with their verdicts, one row per point."""
    allm = [m for p in summary["points"].values() for m in p["metrics"]]
    heads = headline_metrics(allm)
    rms = _rms(allm, "calibration")
    out = []
    for metric in [m for m in heads if re.fullmatch(r"(ts_)?ece_\d+", m) or m == "temperature"]:
        pairs = [(a, b) for a, b in PAIRS if a in rms and b in rms]
        out += [
            f"## Overview: {metric_label(metric)}, all-source average",
            "",
            "| point | "
            + " | ".join(rm_label(r) for r in rms)
            + " | "
            + " | ".join(f"{rm_label(a)} - {rm_label(b)}" for a, b in pairs)
            + " |",
            "|---" * (1 + len(rms) + len(pairs)) + "|",
        ]
        for name, p in summary["points"].items():
            idx = _index(p["metrics"])
            diffs = []
            for a, b in pairs:
                d = next(
                    (
                        x
                        for x in p["differences"]
                        if x["section"] == "calibration"
                        and x["a"] == a
                        and x["b"] == b
                        and x["scope"] == "all_average"
                        and x["metric"] == metric
                    ),
                    None,
                )
                diffs.append("-" if d is None else f"{cell(d, metric)} {VERDICTS[is_significant(d)]}")
            out.append(
                f"| {name} | "
                + " | ".join(cell(idx.get(("calibration", r, "all_average", metric)), metric) for r in rms)
                + " | "
                + " | ".join(diffs)
                + " |"
            )
        out.append("")
    return out
