"""pipeline/calibration/plots.py: the pure helpers behind the plots (colours, Wilson intervals, smoothing,
which RMs get a weight plot) against hand-computed values, and every plot written from tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.calibration import plots as P


REPO = Path(__file__).resolve().parents[1]


def test_colors_are_fixed_per_name_and_stable_across_processes():
    known = ["more", "multitask", "uniform", "averaging"]
    sources = ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    assert len({P.color_for(n) for n in known}) == len(known)  # RMs tell apart
    assert len({P.color_for(n) for n in sources}) == len(sources)  # sources tell apart
    assert P.color_for("MORE") == P.color_for("more") == "#d62728"
    assert P.color_for("single-helpful") == P.color_for("helpful")  # a single-source RM wears its source's colour
    assert P.color_for("my-rm") == P.color_for("my-rm") and P.color_for("my-rm") in P.OTHER_COLORS
    # another process with another hash seed (Python's str hash is salted per process) gives the same colours
    code = "from pipeline.calibration.plots import color_for; print([color_for(n) for n in ('my-rm', 'x', 'more')])"
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([P.color_for(n) for n in ("my-rm", "x", "more")])


def test_smooth_is_a_centered_moving_average():
    x = [1.0, 2.0, 6.0, 4.0, 10.0]
    # window 3: the ends average what exists (no invented values)
    assert P.smooth(x, 3) == pytest.approx([1.5, 3.0, 4.0, 20 / 3, 7.0])
    assert P.smooth(x, 1) == pytest.approx(x)
    brute = [np.mean(x[max(0, i - 2) : i + 3]) for i in range(len(x))]
    assert P.smooth(x, 5) == pytest.approx(brute)


def test_weight_plot_only_for_learned_weights():
    moving = {"a": ([1, 2], [0.4, 0.6]), "b": ([1, 2], [0.6, 0.4])}
    flat = {"a": ([1, 2], [0.5, 0.5]), "b": ([1, 2], [0.5, 0.5])}
    assert P.has_learned_weights("more", moving) and not P.has_learned_weights("more", {})
    for method in ("uniform", "multitask", "single"):
        assert not P.has_learned_weights(method, moving)
    assert P.has_learned_weights("external", moving) and not P.has_learned_weights("external", flat)


def _rewards(rms, sources, n=60, seed=0):
    rng = np.random.default_rng(seed)
    return {rm: {s: (rng.normal(1.0, 1.5, n), rng.normal(0.0, 1.5, n)) for s in sources} for rm in rms}


def test_calibration_plots_skip_weights_of_rms_without_learned_weights(tmp_path):
    """The calibration stage's plots: MORE gets its weight plot; uniform (which logs constant 1/K weights),
    multitask and a single-source RM get none."""
    from pipeline.calibration.stage_plots import write_plots

    sources = ["helpful", "harmless"]
    index = {}
    for rm, method in (
        ("more", "more"),
        ("uniform", "uniform"),
        ("multitask", "multitask"),
        ("single-helpful", "single"),
    ):
        d = tmp_path / "reward" / rm
        d.mkdir(parents=True)
        lam = (
            (lambda s: (0.5 + 0.1 * np.sin(s), 0.5 - 0.1 * np.sin(s))) if method == "more" else (lambda s: (0.5, 0.5))
        )
        log = [
            {"step": s, **{f"more/lambda/{src}": float(v) for src, v in zip(sources, lam(s))}} for s in range(1, 30)
        ]
        (d / "train_log.json").write_text(json.dumps(log))
        index[rm] = {"path": str(d), "method": method}
    rewards = {
        rm: {s: {"test": pair} for s, pair in by_source.items()} for rm, by_source in _rewards(index, sources).items()
    }
    out = tmp_path / "calibration"
    out.mkdir()
    cfg = SimpleNamespace(headline_bins=10, strategy="uniform")
    write_plots(out, index, rewards, sources, {"more": 1.3, "uniform": 1.1}, None, cfg)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "more_weights_more.png",
        "reliability.png",
        "reliability_temperature_scaled.png",
        "reward_differences.png",
    ]
    assert all((out / p).stat().st_size > 5000 for p in pngs)


def test_heatmap_and_trajectories_write_pngs(tmp_path):
    steps = list(range(1, 101))
    traj = {s: (steps, list(0.2 + 0.01 * np.random.default_rng(i).normal(size=100))) for i, s in enumerate("abcde")}
    assert P.more_weight_trajectories(traj, tmp_path / "w.png", title="t").stat().st_size > 5000
    m = np.arange(6).reshape(2, 3) / 6
    assert P.heatmap(m, ["r1", "r2"], ["c1", "c2", "c3"], tmp_path / "h.png", title="t", value_label="v").is_file()
