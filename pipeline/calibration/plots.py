"""PNG plots of the calibration stage and of sweeps (matplotlib, Agg backend; nothing is shown on screen).

Each function takes plain data (numpy arrays / dicts) and a path, writes one PNG and returns the path.
Every plot follows the same rules: legends outside the axes (never over the data), fonts readable at 100%
zoom (`FONT`), a label on every y axis, and one fixed colour per source and per RM in every plot of every run
(`color_for`, a pure function of the name). Reliability diagrams show each bin's item count and its Wilson
95% interval, with sparse bins drawn lighter; MORE's weight trajectories are smoothed (`smooth`) over the
faint raw values.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from pipeline.calibration.metrics import pairwise_calibration, reward_margins
from pipeline.stats import wilson_interval


FONT = 11  # base font size (points); legends and tick labels are one point smaller
DPI = 110
# Fixed colours of the RMs and sources the project names (colour-blind-safe Okabe-Ito / Tableau hues).
FIXED_COLORS = {
    "more": "#d62728",
    "multitask": "#1f77b4",
    "uniform": "#2ca02c",
    "averaging": "#9467bd",
    "helpful": "#e69f00",
    "harmless": "#56b4e9",
    "oasst1": "#009e73",
    "webgpt": "#cc79a7",
    "summarize": "#8c564b",
}
# Any other name gets one of these, chosen by a hash of the name (stable across runs and processes).
OTHER_COLORS = (
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#ff7f0e",
    "#aec7e8",
    "#ff9896",
    "#98df8a",
    "#c5b0d5",
    "#c49c94",
    "#dbdb8d",
)
SPARSE_ITEMS = 20  # reliability bins with fewer items are drawn lighter: their label fraction is noisy


def color_for(name: str) -> str:
    """The colour of an RM or a source, the same in every plot of every run.

    Known names have a fixed colour; a single-source RM ('single-helpful') takes its source's colour; any
    other name is hashed (md5, not Python's salted hash) into `OTHER_COLORS`."""
    key = str(name).lower()
    if key in FIXED_COLORS:
        return FIXED_COLORS[key]
    if key.startswith("single-") and key[len("single-") :] in FIXED_COLORS:
        return FIXED_COLORS[key[len("single-") :]]
    digest = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16)
    return OTHER_COLORS[digest % len(OTHER_COLORS)]


def smooth(values, window: int) -> np.ndarray:
    """Centered moving average over `window` points (odd; shrinks at the ends, so no value is invented)."""
    x = np.asarray(values, dtype=np.float64)
    h = max(0, int(window) // 2)
    if h == 0 or x.size == 0:
        return x.copy()
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(x.size)
    lo, hi = np.maximum(0, i - h), np.minimum(x.size, i + h + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def has_learned_weights(method: str, trajectories: dict) -> bool:
    """Whether an RM's source weights are worth a plot: MORE learns them; uniform, multitask and single-source
    RMs do not (uniform logs constant 1/K weights). An external RM counts only when its logged weights move."""
    if method == "more":
        return bool(trajectories)
    if method != "external":
        return False
    return any(len(v) and np.ptp(np.asarray(v, dtype=np.float64)) > 1e-9 for _, v in trajectories.values())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": FONT,
            "axes.titlesize": FONT + 1,
            "axes.labelsize": FONT,
            "xtick.labelsize": FONT - 1,
            "ytick.labelsize": FONT - 1,
            "legend.fontsize": FONT - 1,
            "figure.titlesize": FONT + 2,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def legend_below(fig, handles, labels, ncol: int | None = None) -> None:
    """One legend for the whole figure, centred below the axes (outside the data)."""
    if handles:
        fig.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=ncol or min(len(labels), 4),
            frameon=False,
        )


def reliability_points(cal: dict, offset: float = 0.0) -> dict:
    """What a reliability diagram draws for one RM and source, from `pairwise_calibration`'s output: per
    non-empty bin, x (mean predicted probability + `offset`), n items, k items labelled preferred, y = k/n and
    its Wilson interval [low, high], and `sparse` (fewer than SPARSE_ITEMS items).

    k comes from the bin's exact target sum (0/1 labels), not from the rounded mean label, and the interval
    is clamped to contain k/n (`pipeline.stats.wilson_interval`), so the error bar lengths y - low and
    high - y are never negative and every array is finite. Raises for soft targets (no counts to bin)."""
    count = np.asarray(cal["count"], dtype=np.float64)
    ok = count > 0
    n = count[ok].astype(np.int64)
    t = np.asarray(cal["target_sum"], dtype=np.float64)[ok]
    k = np.rint(t).astype(np.int64)
    if not np.array_equal(k, t) or np.any(k < 0) or np.any(k > n):
        raise ValueError("reliability_points needs 0/1 labels: a bin's target sum is not a count of its items")
    y = np.array([ki / ni for ki, ni in zip(k.tolist(), n.tolist())], dtype=np.float64)
    bounds = [wilson_interval(ki, ni) for ki, ni in zip(k.tolist(), n.tolist())]
    low = np.array([b[0] for b in bounds], dtype=np.float64)
    high = np.array([b[1] for b in bounds], dtype=np.float64)
    return {
        "x": np.asarray(cal["confidence"], dtype=np.float64)[ok] + offset,
        "y": y,
        "low": low,
        "high": high,
        "n": n,
        "k": k,
        "sparse": n < SPARSE_ITEMS,
    }


def reliability_diagram(
    rewards: dict,
    path: Path,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    temperatures: dict | None = None,
    title: str = "Reliability (both orderings of every pair)",
) -> Path:
    """One column per source; top: fraction preferred vs mean probability per bin for every RM, with each
    bin's Wilson 95% interval (bins with fewer than SPARSE_ITEMS items lighter); bottom: items per bin.

    `rewards` is {rm: {source: (r_chosen, r_rejected)}}; `temperatures` {rm: T} rescales the rewards.
    """
    plt = _plt()
    from matplotlib.lines import Line2D

    rms = list(rewards)
    sources = list(dict.fromkeys(s for rm in rms for s in rewards[rm]))
    fig, axes = plt.subplots(
        2,
        len(sources),
        figsize=(4.4 * len(sources), 6.4),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3]},
        sharex=True,
    )
    width = 1.0 / n_bins / (len(rms) + 1)
    handles: dict = {}
    for j, source in enumerate(sources):
        top, bottom = axes[0, j], axes[1, j]
        top.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        eces = []
        for k, rm in enumerate(rms):
            if source not in rewards[rm]:
                continue
            rc, rr = rewards[rm][source]
            t = (temperatures or {}).get(rm, 1.0)
            cal = pairwise_calibration(rc, rr, n_bins, strategy, t)
            eces.append(f"{rm} {cal['ece']:.3f}")
            c = color_for(rm)
            offset = (k - (len(rms) - 1) / 2) * width
            pts = reliability_points(cal, offset)
            top.plot(pts["x"], pts["y"], "-", color=c, lw=1.2, alpha=0.6)
            handles.setdefault(rm, Line2D([], [], color=c, marker="o", lw=2))
            for sparse, alpha in ((False, 1.0), (True, 0.3)):
                sel = pts["sparse"] == sparse
                if sel.any():
                    y = pts["y"][sel]
                    yerr = np.vstack([y - pts["low"][sel], pts["high"][sel] - y])
                    top.errorbar(pts["x"][sel], y, yerr=yerr, fmt="o", color=c, ms=4, capsize=2, lw=1, alpha=alpha)
            centers = (cal["edges"][:-1] + cal["edges"][1:]) / 2
            bottom.bar(centers + offset, cal["count"], width=width, color=c)
        top.set_title(f"{source}\nECE: {', '.join(eces)}", fontsize=FONT - 1)
        top.set_xlim(0, 1)
        top.set_ylim(-0.02, 1.02)
        top.set_ylabel("fraction preferred (label)")
        bottom.set_ylabel("items per bin")
        bottom.set_xlabel("predicted probability")
        bottom.axhline(SPARSE_ITEMS, color="grey", lw=0.8, ls=":")
    legend_below(fig, list(handles.values()), list(handles))
    fig.suptitle(
        f"{title}\nbars: Wilson 95% interval; lighter: bins with < {SPARSE_ITEMS} items (dotted line below)",
        y=1.0,
    )
    fig.tight_layout()
    return _save(fig, path)


def histogram_edges(arrays, bins: int) -> np.ndarray:
    """`bins` + 1 common, finite, strictly increasing edges spanning the finite values of every array. One
    value, ties or values too close to split get a small range around them; no finite value, [-0.5, 0.5].
    (Margins of finite rewards can overflow to +-inf, 1e308 - -1e308: the caller leaves those out.)"""
    finite = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.linspace(-0.5, 0.5, bins + 1)
    lo, hi = float(finite.min()), float(finite.max())
    edges = np.linspace(lo / 2, hi / 2, bins + 1) * 2  # halved, so a span over the float range cannot overflow
    if np.all(np.diff(edges) > 0):
        return edges
    mid = lo / 2 + hi / 2
    half = max(0.5, abs(mid) * 1e-9)
    return np.linspace(mid - half, mid + half, bins + 1)


def reward_difference_histograms(rewards: dict, path: Path, *, bins: int = 40) -> Path:
    """Histogram of r_chosen - r_rejected per source, every RM overlaid (the paper's Fig. 5). Margins that
    overflow to +-inf are left out of the bins and counted in the panel's title."""
    plt = _plt()
    rms = list(rewards)
    sources = list(dict.fromkeys(s for rm in rms for s in rewards[rm]))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.4 * len(sources), 3.6), squeeze=False)
    handles: dict = {}
    for j, source in enumerate(sources):
        ax = axes[0, j]
        with np.errstate(over="ignore"):
            diffs = {rm: reward_margins(*rewards[rm][source]) for rm in rms if source in rewards[rm]}
        edges = histogram_edges(diffs.values(), bins)
        for rm, d in diffs.items():
            *_, patches = ax.hist(d[np.isfinite(d)], bins=edges, histtype="step", lw=1.5, color=color_for(rm))
            handles.setdefault(rm, patches[0])
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        means = ", ".join(
            f"{rm} {np.abs(d[np.isfinite(d)]).mean():.2f}" for rm, d in diffs.items() if np.isfinite(d).any()
        )
        off = sum(int((~np.isfinite(d)).sum()) for d in diffs.values())
        note = f"; {off} margins overflow (not shown)" if off else ""
        ax.set_title(f"{source}\nmean |d|: {means}{note}", fontsize=FONT - 1)
        ax.set_xlabel("r_chosen - r_rejected")
        ax.set_ylabel("pairs")
        ax.yaxis.get_major_locator().set_params(integer=True)
    legend_below(fig, list(handles.values()), list(handles))
    fig.suptitle("Reward differences on the test pairs", y=1.02)
    fig.tight_layout()
    return _save(fig, path)


def more_weight_trajectories(trajectories: dict, path: Path, *, title: str, window: int | None = None) -> Path:
    """MORE's per-source weights lambda over training steps, {source: (steps, values)}: a centered moving
    average (`smooth`, `window` steps; default about 1/20 of the run) over the faint raw values."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    k = len(trajectories)
    n = max((len(v) for _, v in trajectories.values()), default=0)
    w = window or max(1, (n // 20) | 1)
    marker = "o" if n <= 30 else None  # few logged values: show where they are
    for source, (steps, values) in trajectories.items():
        c = color_for(source)
        if w > 1:
            ax.plot(steps, values, lw=0.8, color=c, alpha=0.25)
        ax.plot(steps, smooth(values, w), lw=2.0, color=c, label=source, marker=marker, ms=4)
    if k:
        ax.axhline(1.0 / k, color="grey", lw=0.8, ls="--", label="uniform 1/K")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lambda (source weight)")
    ax.set_ylim(-0.02, 1.02)  # weights live on the simplex: noise of 1e-7 around 1/K must not look like swings
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    how = f"moving average over {w} logged values; raw values faint" if w > 1 else f"{n} logged values, unsmoothed"
    ax.set_title(f"{title}\n{how}", fontsize=FONT)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def heatmap(
    matrix,
    rows: list[str],
    cols: list[str],
    path: Path,
    *,
    title: str,
    fmt: str = "{:.3f}",
    cmap: str = "viridis",
    value_label: str = "",
) -> Path:
    """An annotated heatmap (rows: trained on, columns: tested on); `value_label` names the colour bar."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3.0, 0.9 * len(rows) + 2.0))
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if math.isfinite(m[i, j]):
                r, g, b, _ = im.cmap(im.norm(m[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    fmt.format(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=FONT - 1,
                    color="white" if dark else "black",
                )
    fig.colorbar(im, ax=ax, label=value_label)
    ax.set_title(title)
    return _save(fig, path)
