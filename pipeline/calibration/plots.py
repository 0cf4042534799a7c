"""PNG plots of the calibration stage (matplotlib, Agg backend; nothing is shown on screen).

Each function takes plain data (numpy arrays / dicts) and a path, writes one PNG and returns the path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.calibration.metrics import pairwise_calibration, reward_margins


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def reliability_diagram(
    rewards: dict,
    path: Path,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    temperatures: dict | None = None,
    title: str = "Reliability (both orderings of every pair)",
) -> Path:
    """One column per source; top: mean label vs mean probability per bin for every RM, bottom: bin counts.

    `rewards` is {rm: {source: (r_chosen, r_rejected)}}; `temperatures` {rm: T} rescales the rewards.
    """
    plt = _plt()
    rms = list(rewards)
    sources = list(dict.fromkeys(s for rm in rms for s in rewards[rm]))
    fig, axes = plt.subplots(
        2,
        len(sources),
        figsize=(3.4 * len(sources), 5.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3]},
        sharex=True,
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 1.0 / n_bins / (len(rms) + 1)
    for j, source in enumerate(sources):
        top, bottom = axes[0, j], axes[1, j]
        top.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        for k, rm in enumerate(rms):
            if source not in rewards[rm]:
                continue
            rc, rr = rewards[rm][source]
            t = (temperatures or {}).get(rm, 1.0)
            cal = pairwise_calibration(rc, rr, n_bins, strategy, t)
            ok = cal["count"] > 0
            c = colors[k % len(colors)]
            top.plot(
                cal["confidence"][ok],
                cal["accuracy"][ok],
                "o-",
                color=c,
                ms=3,
                lw=1.2,
                label=f"{rm} (ECE {cal['ece']:.3f})",
            )
            centers = (cal["edges"][:-1] + cal["edges"][1:]) / 2
            bottom.bar(centers + (k - (len(rms) - 1) / 2) * width, cal["count"], width=width, color=c)
        top.set_title(source)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.legend(fontsize=6, loc="upper left")
        bottom.set_xlabel("predicted probability")
        if j == 0:
            top.set_ylabel("fraction preferred (label)")
            bottom.set_ylabel("items per bin")
    fig.suptitle(title, y=1.01)
    return _save(fig, path)


def reward_difference_histograms(rewards: dict, path: Path, *, bins: int = 40) -> Path:
    """Histogram of r_chosen - r_rejected per source, every RM overlaid (the paper's Fig. 5)."""
    plt = _plt()
    rms = list(rewards)
    sources = list(dict.fromkeys(s for rm in rms for s in rewards[rm]))
    fig, axes = plt.subplots(1, len(sources), figsize=(3.4 * len(sources), 3.2), squeeze=False)
    for j, source in enumerate(sources):
        ax = axes[0, j]
        diffs = {rm: reward_margins(*rewards[rm][source]) for rm in rms if source in rewards[rm]}
        lo = min(float(d.min()) for d in diffs.values())
        hi = max(float(d.max()) for d in diffs.values())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for rm, d in diffs.items():
            ax.hist(d, bins=edges, histtype="step", lw=1.3, label=f"{rm} (mean |d| {np.abs(d).mean():.2f})")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(source)
        ax.set_xlabel("r_chosen - r_rejected")
        if j == 0:
            ax.set_ylabel("pairs")
        ax.legend(fontsize=6)
    fig.suptitle("Reward differences on the test pairs", y=1.04)
    return _save(fig, path)


def more_weight_trajectories(trajectories: dict, path: Path, *, title: str) -> Path:
    """MORE's per-source weights lambda over training steps: {source: (steps, values)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    k = len(trajectories)
    for source, (steps, values) in trajectories.items():
        ax.plot(steps, values, lw=1.3, label=source)
    if k:
        ax.axhline(1.0 / k, color="grey", lw=0.8, ls="--", label="uniform 1/K")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lambda (source weight)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def heatmap(
    matrix, rows: list[str], cols: list[str], path: Path, *, title: str, fmt: str = "{:.3f}", cmap: str = "viridis"
) -> Path:
    """An annotated heatmap (rows: trained on, columns: tested on)."""
    plt = _plt()
    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.8 * len(rows) + 1.8))
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
                    j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8, color="white" if dark else "black"
                )
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)
