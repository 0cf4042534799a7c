"""Aggregation: every finished run's numbers, per grid point, into means and 95% t-intervals over seeds and
seed-paired differences, written as D/summary.json, D/summary.md and the plots.

`aggregate` (after the runs, or alone with `--aggregate D`) reads every finished run's
calibration/metrics.json, calibration/temperatures.json and, when the align stage ran, align/metrics.json and
align/judgements.json (`collect_run`); `aggregate_point` gives, for each RM (or aligned policy, or judged
comparison), scope (a source, hh_average, all_average) and metric: mean, sd, n seeds and a 95% t-interval
over seeds (pipeline.stats.t_interval, clipped to the metric's range); and the seed-paired differences
MORE - MultiTask, MORE - Uniform and Uniform - MultiTask (for aligned policies: per method) with their 95%
t-intervals, the paired t-test's p-value, the verdict and a sentence (pipeline.sweep.metrics). `resummarize`
rebuilds the same files from a summary.json alone.

Imports: pipeline.config, the leaves (io, stats, tables, errors), pipeline.calibration.compare.direction and
the sweep's grid, runner (`run_state`), export, metrics, summary and plots modules.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.calibration.compare import direction
from pipeline.config import load_recipe
from pipeline.errors import RecipeError, redact_credentials
from pipeline.io import atomic_write_json, atomic_write_text, get_path, read_json
from pipeline.stats import CONFIDENCE, paired_differences, t_interval, t_test
from pipeline.sweep.export import EXPORT_FILE, export_mismatch, run_settings, settings_change, settings_outliers
from pipeline.sweep.grid import SWEEP_FILE, check_definition
from pipeline.sweep.metrics import (
    PAIRS,
    _units,
    bounded_interval,
    difference_sentence,
    is_significant,
    metric_label,
    metric_range,
)
from pipeline.sweep.plots import write_plots
from pipeline.sweep.runner import run_state
from pipeline.sweep.summary import render_summary
from pipeline.tables import rm_label


def calibration_values(metrics: dict, temperatures: dict | None, bins: int) -> list[tuple]:
    """[(section, rm, scope, metric, value)] from calibration/metrics.json (+ temperatures.json).

    Metrics: accuracy, ece_<bins>, brier, nll and, on synthetic data, truth_mae / truth_ece_<bins> (against
    the true preference probabilities) and gold_mae; each also after temperature scaling (prefix ts_)."""
    base = {
        "accuracy": ("accuracy",),
        f"ece_{bins}": (f"ece_{bins}",),
        "brier": ("brier",),
        "nll": ("nll",),
        "truth_mae": ("truth", "prob_mae"),
        f"truth_ece_{bins}": ("truth", f"ece_vs_truth_{bins}"),
        "gold_mae": ("truth_gold", "prob_mae"),
    }
    out = []
    for rm, per_scope in metrics.items():
        if not isinstance(per_scope, dict):
            continue
        for scope, m in per_scope.items():
            if not isinstance(m, dict):
                continue
            for name, keys in base.items():
                v = get_path(m, *keys)
                if _present(v):
                    out.append(("calibration", rm, scope, name, _number(v)))
                tv = get_path(m, "temperature_scaled", *keys)
                if name != "accuracy" and _present(tv):
                    out.append(("calibration", rm, scope, f"ts_{name}", _number(tv)))
        t = (temperatures or {}).get(rm) if isinstance(temperatures, dict) else None
        if _present(t):
            out.append(("calibration", rm, "all_average", "temperature", _number(t)))
    return out


def _present(v) -> bool:
    """A value a run wrote for a metric: numbers, and anything else but null, a dict or a list (a string such
    as "nan" or "x" is kept, to be reported by `aggregate_point`, not silently dropped)."""
    return v is not None and not isinstance(v, (dict, list))


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def invalid_reason(metric: str, v) -> str | None:
    """Why a per-seed value cannot be averaged (None when it can): not a number, not finite, or outside the
    metric's range (an ECE of 1e300)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "not a number"
    if not math.isfinite(v):
        return "not finite"
    lo, hi = metric_range(metric)
    if (lo is not None and v < lo - 1e-9) or (hi is not None and v > hi + 1e-9):
        return f"outside the range of {metric_label(metric)} [{lo:g}, {'inf' if hi is None else f'{hi:g}'}]"
    return None


def split_valid(seed, rows: list[tuple]) -> tuple[list[tuple], list[dict]]:
    """(rows whose value can be averaged, a record of every other one: seed, section, rm, scope, metric, the
    value as written and why it was left out)."""
    good, bad = [], []
    for section, name, scope, metric, value in rows:
        why = invalid_reason(metric, value)
        if why is None:
            good.append((section, name, scope, metric, value))
        else:
            bad.append(
                {"seed": str(seed), "section": section, "rm": name, "scope": scope, "metric": metric}
                | {"value": repr(value), "why": why}
            )
    return good, bad


def align_values(metrics: dict | None, judgements: dict | None) -> list[tuple]:
    """[(section, name, scope, metric, value)] from align/metrics.json and align/judgements.json:
    gold reward (per prompt set and 'all') and perplexity (per source) of each policy `<rm>/<method>`, and of
    best-of-N at each align.best_of_n_sizes as the policy `<rm>/best_of_n@<N>`; win/lose rates of each judged
    comparison (`<method>: <a> vs <b>`, or `<a> vs <b>` of two named policies) per prompt set, and the gold
    judge's mean a - b gold-reward difference (`gold_diff`), whose mean over seeds is the seed-paired difference."""
    out = []
    for policy, m in (get_path(metrics, "policies") or {}).items():
        for scope, g in (get_path(m, "gold") or {}).items():
            if _present(get_path(g, "mean")):
                out.append(("align", policy, scope, "gold_reward", _number(g["mean"])))
        for size, g in (get_path(m, "gold_at") or {}).items():  # best-of-N at each align.best_of_n_sizes
            if _present(get_path(g, "mean")):
                out.append(("align", f"{policy}@{size}", "all", "gold_reward", _number(g["mean"])))
        for scope, p in (get_path(m, "perplexity") or {}).items():
            if _present(p):
                out.append(("align", policy, scope, "perplexity", _number(p)))
    for label, per_set in (judgements or {}).items():
        for scope, e in (per_set or {}).items():
            w, lose = get_path(e, "win"), get_path(e, "lose")
            if _present(w) and _present(lose):
                w, lose = _number(w), _number(lose)
                both = all(isinstance(x, float) for x in (w, lose))
                out += [
                    ("judge", label, scope, "win_rate", w),
                    ("judge", label, scope, "lose_rate", lose),
                    ("judge", label, scope, "win_minus_lose", w - lose if both else f"{w!r} - {lose!r}"),
                ]
            if _present(get_path(e, "gold_difference", "mean")):  # the gold judge's paired a - b per run
                out.append(("judge", label, scope, "gold_diff", _number(e["gold_difference"]["mean"])))
    return out


def collect_run(run_dir: Path, bins: int | None = None) -> list[tuple]:
    """Every headline value a finished run wrote (empty when it has none yet)."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "calibration" / "metrics.json")
    out = []
    if isinstance(metrics, dict):
        cfg = read_json(run_dir / "calibration" / "config.json") or {}
        b = bins or int(cfg.get("headline_bins") or 10)
        out += calibration_values(metrics, read_json(run_dir / "calibration" / "temperatures.json"), b)
    out += align_values(
        read_json(run_dir / "align" / "metrics.json"), read_json(run_dir / "align" / "judgements.json")
    )
    return out


def pair_names(a: str, b: str, names: list[str]) -> list[tuple[str, str]]:
    """The (name_a, name_b) to compare for RMs a and b: 'more' vs 'multitask' for calibration rows,
    'more/rjs' vs 'multitask/rjs' (same method) for aligned policies."""
    out = []
    for n in names:
        head, sep, tail = n.partition("/")
        if head == a and (f"{b}{sep}{tail}" in names):
            out.append((n, f"{b}{sep}{tail}"))
    return out


def aggregate_point(per_seed: dict[int, list[tuple]], confidence: float = CONFIDENCE) -> dict:
    """{"metrics": [...], "differences": [...]} for one grid point from {seed: collect_run(...)}; with
    "invalid" (`split_valid`) when a value could not be averaged: it is left out of its metric (whose row then
    names the seeds left out, `left_out`) and of the differences, never silently."""
    table: dict[tuple, dict[int, float]] = {}
    invalid: list[dict] = []
    for seed, rows in per_seed.items():
        good, bad = split_valid(seed, rows)
        invalid += bad
        for section, name, scope, metric, value in good:
            table.setdefault((section, name, scope, metric), {})[seed] = value
    left_out: dict[tuple, list[str]] = {}
    for b in invalid:
        left_out.setdefault((b["section"], b["rm"], b["scope"], b["metric"]), []).append(b["seed"])
    metrics = []
    for key in list(table) + [k for k in left_out if k not in table]:
        section, name, scope, metric = key
        vals = table.get(key, {})
        stats = bounded_interval(t_interval(list(vals.values()), confidence), metric)
        row = {"section": section, "rm": name, "scope": scope, "metric": metric, **stats}
        if key in left_out:
            row["left_out"] = left_out[key]
        metrics.append(row | {"values": {str(s): v for s, v in sorted(vals.items())}})
    differences = []
    for section in ("calibration", "align"):
        names = sorted({k[1] for k in table if k[0] == section})
        for a, b in PAIRS:
            for na, nb in pair_names(a, b, names):
                keys = sorted({(k[2], k[3]) for k in table if k[0] == section and k[1] == na})
                for scope, metric in keys:
                    diffs = paired_differences(
                        table[(section, na, scope, metric)], table.get((section, nb, scope, metric), {})
                    )
                    if not diffs:
                        continue
                    stats = t_test(list(diffs.values()), confidence)
                    va, vb = table[(section, na, scope, metric)], table[(section, nb, scope, metric)]
                    stats["a_mean"] = math.fsum(va[s] for s in diffs) / len(diffs)
                    stats["b_mean"] = math.fsum(vb[s] for s in diffs) / len(diffs)
                    what = f"{metric_label(metric)}, {scope}" + (f" ({na.partition('/')[2]})" if "/" in na else "")
                    differences.append(
                        {
                            "section": section,
                            "a": na,
                            "b": nb,
                            "scope": scope,
                            "metric": metric,
                            **stats,
                            "significant": is_significant(stats),
                            "better": direction(metric),
                            "values": {str(s): v for s, v in sorted(diffs.items())},
                            "sentence": difference_sentence(
                                rm_label(na), rm_label(nb), what, stats, direction(metric), **_units(metric)
                            ),
                        }
                    )
    out = {"metrics": metrics, "differences": differences}
    return out | ({"invalid": invalid} if invalid else {})


def aggregate(out_dir: str | os.PathLike, confidence: float = CONFIDENCE, verify: bool = True) -> dict:
    """Read D/sweep.json and every run's results; write D/summary.json, D/summary.md and the plots.

    With `verify` (the default) a run counts only when its manifest shows every selected stage up to date
    for the sweep's current definition (recipe + overrides + grid values + seed), so results of a run whose
    settings have changed since, or that has not finished, are never aggregated. In a results folder (--export)
    a run counts only when its export.json matches the definition, its run fingerprint included, and its
    settings (recipe.yaml, seeds aside) agree with the other runs of its point (`export_checks`); every run
    left out is named in summary.md with the reason."""
    out_dir = Path(out_dir)
    sweep = read_json(out_dir / SWEEP_FILE)
    if not isinstance(sweep, dict):
        raise RecipeError(
            f"{out_dir / SWEEP_FILE} not found or unreadable: {out_dir} is not a sweep directory "
            "(run python -m pipeline.sweep ... --output-dir there first)"
        )
    check_definition(sweep, out_dir / SWEEP_FILE)
    summary = {"sweep": redact_credentials(sweep), "confidence": confidence, "points": {}}
    for point in sweep["points"]:
        runs, found = _point_runs(out_dir, sweep, point["name"], verify)
        per_seed = {}
        for seed, rows in found.items():
            if not split_valid(seed, rows)[0]:
                runs[str(seed)] = "no valid results (every value left out, see below)"
            else:
                runs[str(seed)] = "collected"
                per_seed[seed] = rows
        runs = {str(s): runs[str(s)] for s in sweep["seeds"]}  # in seed order
        stats = aggregate_point(found, confidence)
        summary["points"][point["name"]] = {"grid": point["values"], "runs": runs, "n_runs": len(per_seed), **stats}
    atomic_write_json(out_dir / "summary.json", summary)
    plots = write_plots(out_dir, summary)
    atomic_write_text(out_dir / "summary.md", render_summary(summary, plots))
    return summary


def _point_runs(out_dir: Path, sweep: dict, name: str, verify: bool) -> tuple[dict, dict]:
    """({seed: status} of the runs left out, {seed: collect_run rows} of those collected) for one point."""
    defined = {(r["point"], int(r["seed"])): r for r in sweep.get("runs", [])}
    runs, found, dirs, other = {}, {}, {}, {}
    for seed in sweep["seeds"]:
        run_dir = out_dir / name / f"seed-{seed}"
        run = defined.get((name, int(seed)))
        if verify and run is None:
            runs[str(seed)] = "not in the sweep definition"
            continue
        if verify and sweep.get("export"):  # a results folder: its export.json must be of this run's definition
            why = export_mismatch(read_json(run_dir / EXPORT_FILE), sweep, run)
            if why.startswith("made with other settings"):
                other[seed] = (why, run_dir)
                continue
            if why:
                runs[str(seed)] = f"not exported ({why})"
                continue
        elif verify:
            state, why = run_state(load_recipe(sweep["recipe"], run["overrides"]), run_dir, sweep.get("stages"))
            if state != "done":
                runs[str(seed)] = f"not done ({why})"
                continue
        rows = collect_run(run_dir)
        if rows:
            found[seed], dirs[seed] = rows, run_dir
        else:
            runs[str(seed)] = "no results"
    if verify and sweep.get("export"):
        for seed, why in settings_outliers(dirs).items():
            runs[str(seed)] = f"left out: {why}"
            found.pop(seed)
            dirs.pop(seed)
        ref = next(((s, st) for s, d in sorted(dirs.items()) if (st := run_settings(d)) is not None), None)
        for seed, (why, run_dir) in other.items():
            change = settings_change(ref, run_dir) if ref else ""
            runs[str(seed)] = f"left out: {why}" + (f"; {change}" if change else "")
    return runs, found


def resummarize(out_dir: str | os.PathLike) -> dict:
    """Rebuild D/summary.json, D/summary.md and the plots from D/summary.json alone: every point's statistics
    are recomputed from the per-seed values its metric rows keep (the same numbers `aggregate` collected), so
    a committed summary follows the current rules and presentation without its run directories."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    if not isinstance(summary, dict) or "points" not in summary:
        raise RecipeError(f"{out_dir / 'summary.json'} not found or not a sweep summary")
    for p in summary["points"].values():
        per_seed: dict[int, list[tuple]] = {}
        for r in p["metrics"]:
            for seed, v in r.get("values", {}).items():
                per_seed.setdefault(int(seed), []).append((r["section"], r["rm"], r["scope"], r["metric"], v))
        p.update(aggregate_point(per_seed, summary["confidence"]))
    summary["sweep"] = redact_credentials(summary.get("sweep") or {})
    atomic_write_json(out_dir / "summary.json", summary)
    plots = write_plots(out_dir, summary)
    atomic_write_text(out_dir / "summary.md", render_summary(summary, plots))
    return summary
