"""The PNGs of the calibration stage, drawn from its results with the plot functions of `plots`.

Imports `plots`, `analysis` (the MORE weight trajectories) and `pipeline.io` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.calibration import plots
from pipeline.calibration.analysis import more_trajectories
from pipeline.io import safe_component


def write_plots(out: Path, index: dict, rewards: dict, sources: list[str], temperatures: dict, diversity, cfg) -> None:
    """The calibration stage's PNGs in `out`: reliability diagrams (before and, with `temperatures`, after
    scaling), reward-difference histograms, one MORE weight plot per trained RM that learned weights, and the
    diversity heatmaps. `rewards`: {rm: {source: {"test": (r_chosen, r_rejected), ...}}}; `cfg`: the
    calibration section (its `headline_bins` and `strategy`)."""
    test = {rm: {s: by_source[s]["test"] for s in sources} for rm, by_source in rewards.items()}
    plots.reliability_diagram(test, out / "reliability.png", n_bins=cfg.headline_bins, strategy=cfg.strategy)
    if temperatures:
        plots.reliability_diagram(
            test,
            out / "reliability_temperature_scaled.png",
            n_bins=cfg.headline_bins,
            strategy=cfg.strategy,
            temperatures=temperatures,
            title="Reliability after temperature scaling",
        )
    plots.reward_difference_histograms(test, out / "reward_differences.png")
    for rm, entry in index.items():
        traj = more_trajectories(entry["path"])
        if plots.has_learned_weights(entry.get("method", ""), traj):  # not uniform, multitask, single-source
            plots.more_weight_trajectories(
                traj, out / f"more_weights_{safe_component(rm)}.png", title=f"MORE source weights ({rm})"
            )
    if diversity:
        rows, cols = [f"{t} ({n})" for n, t in zip(diversity["rms"], diversity["trained_on"])], diversity["tested_on"]
        plots.heatmap(
            100 * np.asarray(diversity["accuracy"], dtype=np.float64),  # in %, as in every table
            rows,
            cols,
            out / "diversity_accuracy.png",
            title="Accuracy (%) of single-source RMs",
            fmt="{:.1f}",
            value_label="accuracy (%), higher is better",
        )
        plots.heatmap(
            diversity[f"ece_{cfg.headline_bins}"],
            rows,
            cols,
            out / "diversity_ece.png",
            title=f"ECE (M={cfg.headline_bins}) of single-source RMs",
            cmap="magma_r",
            value_label="ECE, lower is better",
        )
