"""What the calibration stage says about its own numbers: how many validation pairs a temperature was fitted on
(with a warning under the documented minimum), and which bootstrap interval the ECE's is (a percentile interval
of an upward-biased statistic, with the bias estimated beside it, checked against an independent computation)."""

from __future__ import annotations

import json

import numpy as np
from scipy.special import expit

from pipeline.calibration import metrics as M
from pipeline.calibration.config import CalibrationConfig
from pipeline.calibration.stage import run
from pipeline.calibration.tables import render_table
from pipeline.calibration.temperature import MIN_PAIRS
from tests.helpers import CAL_N_VALID, CAL_SOURCES, calibration_recipe, save_tiny_rm


def _calibrated_pairs(n: int, seed: int):
    """Rewards whose Bradley-Terry probability is the true one: labels drawn from it (true ECE = 0)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 1.5, n)
    chosen_first = rng.random(n) < expit(d)  # the label: is the first response the chosen one
    rc = np.where(chosen_first, d, 0.0)
    rr = np.where(chosen_first, 0.0, d)
    return rc, rr


def test_ece_bias_estimate_matches_an_independent_bootstrap():
    """ece_<M>_bias = mean over resamples of the ECE minus the ECE, recomputed here with `pairwise_ece` on every
    resample drawn by the documented generator (default_rng(seed), one integers(0, n, n) row per resample)."""
    rc, rr = _calibrated_pairs(300, 1)
    iv = M.bootstrap_intervals(rc, rr, n_samples=150, n_bins=10, seed=7)
    rng = np.random.default_rng(7)
    eces = []
    for _ in range(150):
        idx = rng.integers(0, 300, size=300)
        eces.append(M.pairwise_ece(rc[idx], rr[idx], 10))
    assert iv["interval"] == "percentile"
    assert abs(iv["ece_10_bias"] - (np.mean(eces) - M.pairwise_ece(rc, rr, 10))) < 1e-12
    np.testing.assert_allclose(iv["ece_10"], np.percentile(eces, [2.5, 97.5]), atol=1e-12)


def test_the_percentile_interval_of_a_calibrated_rm_sits_above_its_ece():
    """The issue's pattern (0.0105-0.0616 around 0.0107): for an RM whose probabilities are the true ones, the
    resampled ECEs sit above the estimate, which itself sits above the true 0; the bias estimate is positive."""
    biases, above = [], []
    for seed in range(6):
        rc, rr = _calibrated_pairs(400, seed)
        iv = M.bootstrap_intervals(rc, rr, n_samples=200, n_bins=10, seed=seed)
        ece = M.pairwise_ece(rc, rr, 10)
        biases.append(iv["ece_10_bias"])
        above.append(np.mean(iv["ece_10"]) > ece)
    assert all(b > 0 for b in biases) and all(above)


def _metrics_entry(n_valid: int):
    rc, rr = _calibrated_pairs(200, 0)
    per_source = M.all_metrics(rc, rr, n_bins=[10], bootstrap_samples=50, seed=0)
    per_source["temperature_scaled"] = dict(per_source)
    avg = M.average_metrics([per_source])
    avg["temperature_scaled"] = avg
    return {"more": {"helpful": per_source, "all_average": avg}}, {"more": {"n_pairs": n_valid}}


def test_table_names_the_interval_and_the_pairs_the_temperature_was_fitted_on():
    cfg = CalibrationConfig(n_bins=[10], bootstrap_samples=50)
    metrics, fits = _metrics_entry(15)
    md = render_table(metrics, {"more": 1.2}, ["helpful"], [], cfg, None, fits)
    assert "## 95% percentile bootstrap intervals (50 resamples of the test pairs)" in md
    assert "ECE bias (resamples - estimate)" in md and "not where the true calibration error lies" in md
    bias = metrics["more"]["helpful"]["intervals"]["ece_10_bias"]
    assert f"| {bias:+.4f} |" in md
    assert "## Temperature scaling (T fitted on the 15 validation pairs of all sources)" in md
    assert f"**Warning:** the temperature was fitted on only 15 validation pairs (fewer than {MIN_PAIRS}" in md
    metrics, fits = _metrics_entry(MIN_PAIRS)
    md = render_table(metrics, {"more": 1.2}, ["helpful"], [], cfg, None, fits)
    assert f"fitted on the {MIN_PAIRS} validation pairs" in md and "**Warning:**" not in md


def test_stage_log_warns_about_a_temperature_fitted_on_few_pairs(tmp_path, tiny_tok, capsys):
    reward = tmp_path / "reward"
    save_tiny_rm(tiny_tok, reward / "more", seed=0, head_scale=20.0)
    (reward / "index.json").write_text(
        json.dumps({"more": {"path": str(reward / "more"), "method": "more", "sources": CAL_SOURCES}})
    )
    run(calibration_recipe(bootstrap_samples=0), tmp_path)
    n = CAL_N_VALID * len(CAL_SOURCES)
    assert n < MIN_PAIRS
    out = capsys.readouterr().out
    assert f"[calibration] warning: more: the temperature was fitted on only {n} validation pairs" in out
    fit = json.loads((tmp_path / "calibration" / "temperature_fits.json").read_text())["more"]
    assert fit["n_pairs"] == n
    assert f"fitted on the {n} validation pairs" in (tmp_path / "calibration" / "table.md").read_text()
