"""The sweep's plots: D/plot_<axis>.png per grid axis (headline metrics, all-source average, vs the axis
value, one line per RM with its 95% interval band; one figure per combination of the other axes' values) or,
without a grid, D/plot_seeds.png (per-seed values, mean and interval per RM). Only finite numbers reach
matplotlib (`band_arrays`, `seed_bar`).

Imports: pipeline.config (yaml_load, to read an axis value as a number), the leaf pipeline.tables,
pipeline.calibration.compare and pipeline.calibration.plots (inside `write_plots`), and the sweep's grid,
metrics and summary modules.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pipeline.calibration.compare import DIRECTION_TEXT, direction
from pipeline.config import yaml_load
from pipeline.sweep.grid import _safe, axis_labels
from pipeline.sweep.metrics import MIN_SEEDS, PERCENT_METRICS, metric_label
from pipeline.sweep.summary import _index, _rms, headline_metrics
from pipeline.tables import RM_LABELS, rm_label


def _number(text: str):
    try:
        v = yaml_load(text)
    except Exception:  # noqa: BLE001 - any unparsable value is plotted as a category
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _axis_label(metric: str) -> str:
    """A panel's y-axis label: the metric, its unit and which direction is better."""
    unit = " (%)" if metric in PERCENT_METRICS else ""
    return f"{metric_label(metric)}{unit}\n({DIRECTION_TEXT[direction(metric)]})"


def _finite(x) -> float | None:
    """x as a float when it is a finite number, else None (a summary may hold None, NaN, inf or a string)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _scaled(x, scale: float) -> float | None:
    """scale * x when both it and x are finite numbers (1e306 in percent overflows), else None."""
    x = _finite(x)
    return None if x is None else _finite(scale * x)


def band_arrays(xs: list, rows: list, scale: float = 1.0):
    """The line and band of one RM in a grid plot: (x, mean, low, high) float arrays over the grid points
    whose summary row has a finite mean; a missing or non-finite interval end is the mean itself (a zero-width
    band). Every array is finite, so matplotlib never sees NaN, inf or None."""
    import numpy as np

    out = []
    for x, r in zip(xs, rows):
        m = _scaled((r or {}).get("mean"), scale)
        if m is None:
            continue
        lo, hi = _scaled(r.get("low"), scale), _scaled(r.get("high"), scale)
        out.append((x, m, m if lo is None else lo, m if hi is None else hi))
    cols = list(zip(*out)) if out else [(), (), (), ()]
    return tuple(np.asarray(c, dtype=np.float64) for c in cols)


def seed_bar(row: dict | None, scale: float = 1.0) -> dict | None:
    """What plot_seeds.png draws for one RM and metric: its finite per-seed values, the mean and the interval
    ends (None when either is missing or non-finite), all scaled; None without a finite mean. The interval is
    drawn as a segment from low to high, so a mean outside it (values outside the metric's range, where the
    interval was clipped) cannot produce a negative error bar."""
    import numpy as np

    m = _scaled((row or {}).get("mean"), scale)
    if m is None:
        return None
    values = row.get("values") or {}
    values = values.values() if isinstance(values, dict) else values
    vals = [v for v in (_scaled(x, scale) for x in values) if v is not None]
    lo, hi = _scaled(row.get("low"), scale), _scaled(row.get("high"), scale)
    if lo is None or hi is None:
        lo = hi = None
    return {"values": np.asarray(vals, dtype=np.float64), "mean": m, "low": lo, "high": hi}


def write_plots(out_dir: Path, summary: dict) -> list[str]:
    """PNGs of the all-source averages of the headline metrics (accuracy in %, ECE before / after temperature
    scaling, temperature), one colour per RM (`plots.color_for`), y axes labelled, legend below the panels.

    With a grid: one PNG per grid axis (and per combination of the other axes' values), each metric vs the
    axis value, one line per RM, the t-interval as a band. Without a grid (seeds only): plot_seeds.png, each
    RM's per-seed values as dots with the mean and its t-interval. Returns the file names."""
    grid = summary["sweep"].get("grid") or []
    points = summary["points"]
    if not points:
        return []
    heads = headline_metrics([m for p in points.values() for m in p["metrics"]])
    ece = next((m for m in heads if m.startswith("ece_")), None)
    panels = [m for m in ("accuracy", ece, f"ts_{ece}" if ece else None, "temperature") if m and m in heads]
    if not panels:
        return []
    from pipeline.calibration.plots import _plt, _save, color_for, legend_below

    plt = _plt()
    conf = f"{100 * summary['confidence']:.0f}%"
    if not grid:
        return [_seed_plot(plt, out_dir, summary, panels, conf, _save, color_for, legend_below)]
    keys = [k for k, _ in grid]
    labels = axis_labels(keys)
    written = []
    for key, values in grid:
        others = [k for k in keys if k != key]
        combos = itertools.product(*(dict(grid)[k] for k in others)) if others else [()]
        for combo in combos:
            fixed = dict(zip(others, combo))
            nums = [_number(v) for v in values]
            xs = nums if all(n is not None for n in nums) else list(range(len(values)))
            fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
            handles: dict = {}
            for ax, metric in zip(axes[0], panels):
                scale = 100.0 if metric in PERCENT_METRICS else 1.0
                rms = []
                for p in points.values():
                    rms += [r["rm"] for r in p["metrics"] if r["section"] == "calibration" and r["metric"] == metric]
                for rm in sorted(set(rms), key=lambda n: (n not in RM_LABELS, n)):
                    rows = []
                    for v in values:
                        pt = next(
                            (
                                p
                                for p in points.values()
                                if p["grid"].get(key) == v and all(p["grid"].get(k) == fv for k, fv in fixed.items())
                            ),
                            None,
                        )
                        rows.append(
                            _index(pt["metrics"]).get(("calibration", rm, "all_average", metric)) if pt else None
                        )
                    xx, ys, lo, hi = band_arrays(xs, rows, scale)
                    if len(xx):
                        c = color_for(rm)
                        handles[rm_label(rm)] = ax.plot(xx, ys, marker="o", color=c, lw=1.8)[0]
                        ax.fill_between(xx, lo, hi, alpha=0.2, color=c)
                if metric == "temperature":
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xlabel(labels[key])
                ax.set_ylabel(_axis_label(metric))
                ax.set_title(metric_label(metric) + " (all sources)")
                if xs != nums:
                    ax.set_xticks(xs, values)
                ax.grid(alpha=0.3)
            legend_below(fig, list(handles.values()), list(handles))
            sub = "" if not fixed else " (" + ", ".join(f"{labels[k]}={v}" for k, v in fixed.items()) + ")"
            fig.suptitle(f"mean and {conf} t-interval over seeds{sub}")
            fig.tight_layout()
            name = "plot_" + _safe(labels[key]) + "".join("__" + _safe(f"{labels[k]}={v}") for k, v in fixed.items())
            _save(fig, out_dir / f"{name}.png")
            written.append(f"{name}.png")
    return written


def _seed_plot(plt, out_dir: Path, summary: dict, panels: list[str], conf: str, save, color_for, legend_below) -> str:
    """plot_seeds.png of a sweep without a grid: per panel, each RM's per-seed values (dots) and its mean with
    the t-interval (bar; clipped to the metric's range)."""
    import numpy as np

    p = next(iter(summary["points"].values()))
    idx = _index(p["metrics"])
    rms = _rms(p["metrics"], "calibration")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.0), squeeze=False)
    handles: dict = {}
    for ax, metric in zip(axes[0], panels):
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        for i, rm in enumerate(rms):
            bar = seed_bar(idx.get(("calibration", rm, "all_average", metric)), scale)
            if bar is None:
                continue
            c = color_for(rm)
            vals = bar["values"]
            if vals.size:
                jitter = np.linspace(-0.12, 0.12, vals.size) if vals.size > 1 else np.zeros(1)
                ax.scatter(i + jitter, vals, color=c, alpha=0.5, s=22, zorder=2)
            if bar["low"] is not None:  # the interval as a segment: drawn as given, even if it misses the mean
                ax.vlines(i + 0.3, bar["low"], bar["high"], color=c, lw=1.5)
                ax.hlines([bar["low"], bar["high"]], i + 0.24, i + 0.36, color=c, lw=1.5)
            handles[rm_label(rm)] = ax.plot(i + 0.3, bar["mean"], "D", color=c, ms=6)[0]
        if metric == "temperature":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rms)), [rm_label(r) for r in rms])
        ax.set_xlim(-0.5, len(rms) - 0.3)
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(metric_label(metric) + " (all sources)")
        ax.grid(alpha=0.3, axis="y")
    legend_below(fig, list(handles.values()), list(handles))
    n = p["n_runs"]
    warn = f"; only {n} seeds: very wide intervals" if 2 <= n < MIN_SEEDS else ""
    fig.suptitle(
        f"dots: seeds; diamond and bar: mean and {conf} t-interval over {n} seeds (clipped to the range){warn}"
    )
    fig.tight_layout()
    save(fig, out_dir / "plot_seeds.png")
    return "plot_seeds.png"
