"""The report's calibration section: what this run measured, in sentences computed from the numbers.

With calibration/comparisons.json, a difference is called real only when its paired 95% bootstrap interval excludes
0 AND p < 0.05 (`comparison_sentences`, through `pipeline.calibration.compare.difference_sentence`); without it the numbers are
shown side by side with no verdict (`calibration_sentences`). Then the train-overlap line, the other RMs,
calibration/table.md and comparisons.md nested, and the plots.

Imports `pipeline.calibration.compare`, the leaves `pipeline.io` and `pipeline.tables`, and the report's `config`
and `sections`.
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.calibration.compare import difference_sentence, is_step0_comparison, parse_comparison, rule_text
from pipeline.io import get_path, read_json
from pipeline.report.config import ReportConfig
from pipeline.report.notes import step0_lines
from pipeline.report.sections import demote
from pipeline.tables import RM_LABELS


def compare_sentence(
    what: str,
    more: float | None,
    base: float | None,
    *,
    lower_is_better: bool,
    base_name: str = "MultiTask",
    unit: str = "",
) -> str:
    """The two values side by side WITHOUT a verdict: used only when no paired interval exists
    (calibration/comparisons.json missing), since a difference without an interval may be noise."""
    if more is None or base is None or not (math.isfinite(more) and math.isfinite(base)):
        return f"{what}: not available for both MORE and {base_name}."
    fmt = (lambda v: f"{v:.2f}{unit}") if unit else (lambda v: f"{v:.4f}")
    if more == base:
        return f"{what}: MORE and {base_name} are equal ({fmt(more)})."
    sign = "+" if more > base else "-"
    return (
        f"{what}: MORE {fmt(more)} vs {base_name} {fmt(base)} (difference {sign}{fmt(abs(more - base))}; "
        f"{'lower' if lower_is_better else 'higher'} is better, but no paired interval was computed, so this is "
        "no verdict)."
    )


def calibration_summary(metrics: dict, headline_bins: int, baseline: str = "multitask") -> dict:
    """The numbers the report compares, pulled out of calibration/metrics.json."""
    ece = f"ece_{headline_bins}"
    out: dict = {"headline_bins": headline_bins, "rms": {}}
    for rm, m in metrics.items():
        row = {}
        for avg in ("all_average", "hh_average"):
            row[avg] = {
                "accuracy": get_path(m, avg, "accuracy"),
                "ece": get_path(m, avg, ece),
                "ece_temperature_scaled": get_path(m, avg, "temperature_scaled", ece),
                "truth_mae": get_path(m, avg, "truth", "prob_mae"),
                "truth_ece": get_path(m, avg, "truth", f"ece_vs_truth_{headline_bins}"),
                "gold_mae": get_path(m, avg, "truth_gold", "prob_mae"),
            }
        out["rms"][rm] = row
    out["baseline"] = baseline
    return out


def comparison_sentences(comparisons: dict, headline_bins: int, n_samples: int | None = None) -> list[str]:
    """Sentences from calibration/comparisons.json: a difference is called real only when its paired 95%
    bootstrap interval excludes 0 and p < 0.05 (compare.difference_sentence); `n_samples`: the bootstrap
    resamples behind the p-values (their resolution is printed when they are few)."""
    ece = f"ece_{headline_bins}"
    rows = [
        (ece, f"ECE (M={headline_bins})", True, 1.0, 4, ""),
        ("accuracy", "Accuracy", False, 100.0, 2, " points"),
        (f"temperature_scaled/{ece}", f"ECE (M={headline_bins}) after temperature scaling", True, 1.0, 4, ""),
        ("truth/prob_mae", "Error against the true preference probabilities (mean |p_RM - p_true|)", True, 1.0, 4, ""),
        ("truth_gold/prob_mae", "Error against the shared gold preference (mean |p_RM - p_gold|)", True, 1.0, 4, ""),
    ]
    out = []
    for label, groups in comparisons.items():
        a, b = (RM_LABELS.get(n, n) for n in parse_comparison(label))
        for group, scope in (("all_average", "all sources"), ("hh_average", "Helpful & Harmless")):
            for key, what, lower, scale, digits, unit in rows:
                entry = get_path(groups, group, key)
                if entry is None or (key.startswith("truth") and group != "all_average"):
                    continue
                out.append(
                    difference_sentence(
                        a,
                        b,
                        f"{what}, {scope}",
                        entry,
                        lower_is_better=lower,
                        scale=scale,
                        digits=digits,
                        unit=unit,
                        n_samples=n_samples,
                    )
                )
    return out


def calibration_sentences(summary: dict) -> list[str]:
    """MORE vs the baseline, side by side without verdicts: the fallback when comparisons.json is missing."""
    rms, base = summary["rms"], summary["baseline"]
    if "more" not in rms or base not in rms:
        return [f"(MORE and {base} were not both evaluated, so there is no head-to-head comparison.)"]
    base_name = "MultiTask" if base == "multitask" else base
    h = summary["headline_bins"]
    m, b = rms["more"], rms[base]
    out = []
    for avg, label in (("all_average", "all sources"), ("hh_average", "Helpful & Harmless")):
        if m[avg]["ece"] is None:
            continue
        out.append(
            compare_sentence(
                f"ECE (M={h}), {label}", m[avg]["ece"], b[avg]["ece"], lower_is_better=True, base_name=base_name
            )
        )
        acc_m, acc_b = m[avg]["accuracy"], b[avg]["accuracy"]
        out.append(
            compare_sentence(
                f"Accuracy, {label}",
                None if acc_m is None else 100 * acc_m,
                None if acc_b is None else 100 * acc_b,
                lower_is_better=False,
                base_name=base_name,
                unit="%",
            )
        )
    if m["all_average"]["truth_mae"] is not None:
        out.append(
            compare_sentence(
                "Error against the true preference probabilities (mean |p_RM - p_true|)",
                m["all_average"]["truth_mae"],
                b["all_average"]["truth_mae"],
                lower_is_better=True,
                base_name=base_name,
            )
        )
    if m["all_average"]["gold_mae"] is not None:
        out.append(
            compare_sentence(
                "Error against the shared gold preference (mean |p_RM - p_gold|)",
                m["all_average"]["gold_mae"],
                b["all_average"]["gold_mae"],
                lower_is_better=True,
                base_name=base_name,
            )
        )
    return out


def train_overlap_line(metrics: dict) -> str | None:
    """One sentence on the evaluation pairs whose prompt the RM was trained on (metrics.json's train_overlap)."""
    parts, excluded = [], None
    for rm, m in metrics.items():
        o = m.get("train_overlap") if isinstance(m, dict) else None
        if not isinstance(o, dict):
            continue
        excluded = o.get("excluded")
        if not o.get("checked"):
            parts.append(f"{rm}: not checked (no train_prompts.json beside it)")
            continue
        kept_sources = set(o.get("kept_sources") or [])
        n = {True: 0, False: 0}
        for sp in ("test", "validation"):
            for source, v in (o.get(sp) or {}).items():
                n[source in kept_sources] += v or 0
        text = f"{rm}: {n[False]} left out" if excluded else f"{rm}: {n[True]} kept"
        if excluded and n[True]:
            text += f", {n[True]} kept on synthetic sources (their test pairs reuse the training prompts by design)"
        parts.append(text)
    if not parts:
        return None
    how = (
        "calibration.exclude_train_overlap is on"
        if excluded
        else "calibration.exclude_train_overlap=false, so scores on them are inflated"
    )
    return f"Evaluation pairs whose prompt the RM was trained on ({how}): " + "; ".join(parts) + "."


def calibration_section(run_dir: Path, cfg: ReportConfig, headline_bins: int) -> tuple[list[str], dict | None]:
    """The report's calibration section and the summary behind its sentences (None when the stage has not run)."""
    cal = run_dir / "calibration"
    lines = ["## Calibration", ""]
    metrics = read_json(cal / "metrics.json")
    if not metrics:
        return lines + ["The calibration stage has not run in this directory (no calibration/metrics.json).", ""], None
    summary = calibration_summary(metrics, headline_bins, cfg.baseline)
    comparisons = read_json(cal / "comparisons.json") or {}
    n_samples = (read_json(cal / "config.json") or {}).get("bootstrap_samples")
    between_rms = {k: v for k, v in comparisons.items() if not is_step0_comparison(k)}  # not an RM vs its step 0
    if between_rms:
        summary["sentences"] = comparison_sentences(between_rms, headline_bins, n_samples)
        lines += [
            "What this run measured, as paired differences with 95% bootstrap intervals over the same test "
            f"pairs. A difference counts only when {rule_text(n_samples)}; lower ECE and error and higher "
            "accuracy are better:",
            "",
        ]
    else:
        summary["sentences"] = calibration_sentences(summary)
        between = " between RMs" if comparisons else ""  # only each RM vs its step 0
        lines += [
            f"What this run measured (no paired comparisons{between} were computed, so no differences{between} are "
            "judged):",
            "",
        ]
    lines += [f"- {s}" for s in summary["sentences"]]
    lines.append("")
    learned, summary["step0"] = step0_lines(run_dir, comparisons, n_samples, rule_stated=bool(between_rms))
    lines += learned
    if overlap := train_overlap_line(metrics):
        lines += [overlap, ""]
    others = [rm for rm in metrics if rm not in ("more", cfg.baseline)]
    if others:
        ece = f"ece_{headline_bins}"
        lines += [
            "Other RMs (all-source average): "
            + "; ".join(
                f"{rm} acc {100 * get_path(metrics, rm, 'all_average', 'accuracy'):.2f}% / ECE "
                f"{get_path(metrics, rm, 'all_average', ece):.4f}"
                for rm in others
                if get_path(metrics, rm, "all_average", ece) is not None
            )
            + ".",
            "",
        ]
    for name in ("table.md", "comparisons.md"):
        if (cal / name).exists():
            lines += [demote((cal / name).read_text(encoding="utf-8")), ""]
    pngs = sorted(cal.glob("*.png"))
    if pngs:
        lines += ["### Plots", ""]
        lines += [f"![{p.stem}](calibration/{p.name})" for p in pngs]
        lines.append("")
    return lines, summary
