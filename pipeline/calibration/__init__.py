"""Reward-model calibration: metrics (pure functions), temperature scaling and the calibration stage."""

from pipeline.calibration.metrics import (
    accuracy,
    all_metrics,
    bootstrap_intervals,
    brier_score,
    nll,
    pairwise_calibration,
    pairwise_ece,
    reward_difference_stats,
    top_label_ece,
    truth_metrics,
)
from pipeline.calibration.temperature import fit_temperature


__all__ = [
    "accuracy",
    "all_metrics",
    "bootstrap_intervals",
    "brier_score",
    "fit_temperature",
    "nll",
    "pairwise_calibration",
    "pairwise_ece",
    "reward_difference_stats",
    "top_label_ece",
    "truth_metrics",
]
