"""Calibration metrics and temperature scaling against independent references (loops, float64, by hand)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.calibration import metrics as M
from pipeline.calibration.temperature import fit_temperature, nll_at


LN3 = math.log(3.0)


# ----------------------------------------------------------------------------------------------------
# Independent references: plain Python loops in float64
# ----------------------------------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_ece(rc, rr, n_bins, strategy="uniform", temperature=1.0, targets=None):
    """Loop reference of the paper's ECE: both orderings, bins (a, b], p == lowest edge in the first bin."""
    items = []
    for i, (c, r) in enumerate(zip(rc, rr)):
        p = _sigmoid((float(c) - float(r)) / temperature)
        t = 1.0 if targets is None else float(targets[i])
        items += [(p, t), (1.0 - p, 1.0 - t)]
    if strategy == "uniform":
        edges = [k / n_bins for k in range(n_bins + 1)]
    else:
        edges = list(np.percentile([p for p, _ in items], [100.0 * k / n_bins for k in range(n_bins + 1)]))
    bins = [[] for _ in range(n_bins)]
    for p, t in items:
        k = 0
        while k < n_bins - 1 and p > edges[k + 1]:
            k += 1
        bins[k].append((p, t))
    ece, gaps = 0.0, []
    for b in bins:
        if b:
            gap = abs(sum(t for _, t in b) / len(b) - sum(p for p, _ in b) / len(b))
            ece += len(b) / len(items) * gap
            gaps.append(gap)
    return ece, sum(gaps) / len(gaps), max(gaps)


def ref_top_label_ece(rc, rr, n_bins):
    items = []
    for c, r in zip(rc, rr):
        p = _sigmoid(c - r)
        items.append((max(p, 1 - p), 1.0 if c > r else (0.0 if c < r else 0.5)))
    bins = [[] for _ in range(n_bins)]
    for conf, ok in items:
        k = 0
        while k < n_bins - 1 and conf > 0.5 + (k + 1) * 0.5 / n_bins:
            k += 1
        bins[k].append((conf, ok))
    return sum(
        len(b) / len(items) * abs(sum(o for _, o in b) / len(b) - sum(c for c, _ in b) / len(b)) for b in bins if b
    )


def random_rewards(n, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    rc = rng.normal(0.3, scale, n)
    rr = rng.normal(0.0, scale, n)
    return rc, rr


# ----------------------------------------------------------------------------------------------------
# ECE
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bins", [1, 5, 10, 20])
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_pairwise_ece_matches_loop_reference(n_bins, strategy):
    rc, rr = random_rewards(157, seed=n_bins)
    cal = M.pairwise_calibration(rc, rr, n_bins, strategy)
    ece, ace, mce = ref_ece(rc, rr, n_bins, strategy)
    assert cal["ece"] == pytest.approx(ece, abs=1e-12)
    assert cal["ace"] == pytest.approx(ace, abs=1e-12)
    assert cal["mce"] == pytest.approx(mce, abs=1e-12)
    assert M.pairwise_ece(rc, rr, n_bins, strategy) == pytest.approx(ece, abs=1e-12)
    assert cal["count"].sum() == 2 * 157


def test_pairwise_ece_with_temperature_matches_reference():
    rc, rr = random_rewards(80, seed=3, scale=5.0)
    assert M.pairwise_ece(rc, rr, 10, temperature=3.7) == pytest.approx(
        ref_ece(rc, rr, 10, temperature=3.7)[0], abs=1e-12
    )
    assert M.pairwise_ece(rc / 3.7, rr / 3.7, 10) == pytest.approx(
        M.pairwise_ece(rc, rr, 10, temperature=3.7), abs=1e-12
    )


def test_torch_inputs_any_dtype_match_numpy():
    rc, rr = random_rewards(64, seed=1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tc, tr = torch.tensor(rc, dtype=dtype), torch.tensor(rr, dtype=dtype)
        # the same (rounded) values as numpy float64 give the same numbers
        nc, nr = tc.double().numpy(), tr.double().numpy()
        assert M.pairwise_ece(tc, tr) == M.pairwise_ece(nc, nr)
        assert M.accuracy(tc, tr) == M.accuracy(nc, nr)
    assert M.pairwise_ece(list(rc), list(rr)) == M.pairwise_ece(rc, rr)


def test_bins_are_right_closed_and_zero_goes_first():
    edges = M.bin_edges(None, 10, "uniform")
    probs = np.array([0.0, edges[1], np.nextafter(edges[1], 1), edges[5], np.nextafter(edges[5], 1), 1.0])
    assert M.bin_ids(probs, edges).tolist() == [0, 0, 1, 4, 5, 9]


def test_perfectly_calibrated_set_has_zero_error():
    # 3 pairs with p = 0.75 and 1 with p = 0.25: in the bin of 0.75 the label mean is 3/4, in that of 0.25 it is 1/4
    rc = np.array([LN3, LN3, LN3, 0.0])
    rr = np.array([0.0, 0.0, 0.0, LN3])
    for m in (2, 5, 10, 20):
        cal = M.pairwise_calibration(rc, rr, m)
        assert cal["ece"] == pytest.approx(0.0, abs=1e-12)
        assert cal["mce"] == pytest.approx(0.0, abs=1e-12)
    assert M.accuracy(rc, rr) == 0.75
    assert M.brier_score(rc, rr) == pytest.approx((3 * 0.25**2 + 0.75**2) / 4)
    assert M.nll(rc, rr) == pytest.approx((3 * -math.log(0.75) - math.log(0.25)) / 4)


def test_over_confident_set_by_hand():
    # p = 0.85 for every pair (away from bin edges) but only 6 of 10 chosen responses win:
    # bin of 0.85 holds 6 x (0.85, 1) + 4 x (0.85, 0), bin of 0.15 the mirror image: both off by 0.25
    d = math.log(0.85 / 0.15)
    rc = np.array([d] * 6 + [0.0] * 4)
    rr = np.array([0.0] * 6 + [d] * 4)
    cal = M.pairwise_calibration(rc, rr, 10)
    assert cal["ece"] == pytest.approx(0.25, abs=1e-12)
    assert cal["ace"] == pytest.approx(0.25, abs=1e-12)
    assert cal["mce"] == pytest.approx(0.25, abs=1e-12)
    assert cal["count"].tolist() == [0, 10, 0, 0, 0, 0, 0, 0, 10, 0]
    assert M.accuracy(rc, rr) == pytest.approx(0.6)
    assert M.brier_score(rc, rr) == pytest.approx((6 * 0.15**2 + 4 * 0.85**2) / 10)
    assert M.nll(rc, rr) == pytest.approx((6 * -math.log(0.85) + 4 * -math.log(0.15)) / 10)
    # with temperature 1e6 it predicts ~0.5 (just above for the 6 winners, just below for the 4 losers):
    # bin (0.5, 0.6] holds 6 x (0.5+, 1) + 4 x (0.5+, 0), so it is now under-confident by 0.1
    assert M.pairwise_ece(rc, rr, 10, temperature=1e6) == pytest.approx(0.1, abs=1e-6)


def test_all_ties():
    rc = rr = np.full(7, 1.25)
    out = M.all_metrics(rc, rr, bootstrap_samples=50)
    assert out["accuracy"] == 0.5
    assert out["n_ties"] == 7 and out["n_pairs"] == 7
    assert out["ece_5"] == out["ece_10"] == out["ece_20"] == 0.0
    assert out["nll"] == pytest.approx(math.log(2))
    assert out["brier"] == pytest.approx(0.25)
    assert out["reward_diff"]["mean_abs_diff"] == 0.0 and out["reward_diff"]["n_outliers"] == 0
    assert out["intervals"]["accuracy"] == [0.5, 0.5]
    assert M.top_label_ece(rc, rr, 5) == 0.0


def _away_from_edges(n, seed, n_bins_list):
    """Pairs whose p is at least 1e-6 from every bin edge of every M in n_bins_list (and from 1/2)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, 4 * n)
    edges = np.unique(np.concatenate([np.linspace(0, 1, m + 1) for m in n_bins_list]))
    ok = np.min(np.abs(p[:, None] - edges[None, :]), axis=1) > 1e-6
    p = p[ok][:n]
    return np.log(p / (1 - p)), np.zeros(n)  # r_c - r_r = logit(p)


@pytest.mark.parametrize("m", [2, 4, 10, 20])
def test_symmetrized_ece_equals_top_label_ece_with_half_the_bins(m):
    rc, rr = _away_from_edges(300, seed=m, n_bins_list=[m])
    sym = M.pairwise_ece(rc, rr, m)
    top = M.top_label_ece(rc, rr, m // 2)
    assert sym == pytest.approx(top, abs=1e-12)
    assert top == pytest.approx(ref_top_label_ece(rc, rr, m // 2), abs=1e-12)


def test_identity_holds_exactly_with_ties_at_one_half():
    # p = 1/2 exactly (reward ties): symmetrized bin (0.4, 0.5] gets (0.5, 1) and (0.5, 0); top-label bin
    # [0.5, 0.6] gets (0.5, correct 1/2): both contribute zero error; other pairs stay off the edges.
    rc, rr = _away_from_edges(100, seed=7, n_bins_list=[10])
    rc = np.concatenate([rc, np.zeros(5)])
    rr = np.concatenate([rr, np.zeros(5)])
    # keep pairs with p in (0.4, 0.6) out so the tie bins hold only ties
    keep = np.abs(1 / (1 + np.exp(-(rc - rr))) - 0.5) > 0.1
    keep[-5:] = True
    assert M.pairwise_ece(rc[keep], rr[keep], 10) == pytest.approx(M.top_label_ece(rc[keep], rr[keep], 5), abs=1e-12)


def test_quantile_bins_have_equal_mass():
    rc, rr = random_rewards(1000, seed=5)
    cal = M.pairwise_calibration(rc, rr, 10, "quantile")
    assert cal["count"].tolist() == [200] * 10


def test_unknown_strategy_and_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown bin strategy 'equal'"):
        M.pairwise_ece([1.0], [0.0], 10, "equal")
    with pytest.raises(ValueError, match="unknown bin strategy"):
        M.all_metrics([1.0], [0.0], strategy="kmeans")
    with pytest.raises(ValueError, match="same length"):
        M.pairwise_ece([1.0, 2.0], [0.0])
    with pytest.raises(ValueError, match="non-finite"):
        M.pairwise_ece([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="n_bins"):
        M.pairwise_ece([1.0], [0.0], 0)
    with pytest.raises(ValueError, match="temperature"):
        M.pairwise_ece([1.0], [0.0], temperature=0.0)


# ----------------------------------------------------------------------------------------------------
# Other metrics
# ----------------------------------------------------------------------------------------------------
def test_accuracy_counts_ties_half():
    assert M.accuracy([2, 1, 1, 0], [1, 1, 2, 0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_nll_and_brier_match_float64_reference_and_are_stable():
    rc, rr = random_rewards(50, seed=11, scale=30.0)  # large margins: naive log(sigmoid) would underflow
    ref_nll = (
        sum(
            -math.log(_sigmoid(c - r)) if c - r > -30 else -(c - r) + math.log1p(math.exp(c - r))
            for c, r in zip(rc, rr)
        )
        / 50
    )
    assert M.nll(rc, rr) == pytest.approx(ref_nll, rel=1e-10)
    assert M.brier_score(rc, rr) == pytest.approx(
        sum((1 - _sigmoid(c - r)) ** 2 for c, r in zip(rc, rr)) / 50, rel=1e-12
    )
    assert math.isfinite(M.nll([1000.0], [-1000.0])) and M.nll([-1000.0], [1000.0]) == pytest.approx(2000.0)


def test_reward_difference_stats_by_hand():
    rc = np.array([1.0, 2.0, -1.0, 1.0, 10.0, 0.0])
    rr = np.array([0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # |d| = 1, 1, 1, 1, 10, 1
    s = M.reward_difference_stats(rc, rr)
    assert s["mean_abs_diff"] == pytest.approx(15 / 6)
    assert s["q1"] == s["q3"] == 1.0 and s["iqr"] == 0.0
    assert s["n_outliers"] == 1 and s["outlier_mean"] == 10.0 and s["inlier_mean"] == 1.0
    assert s["outlier_fraction"] == pytest.approx(1 / 6)
    assert s["mean_diff"] == pytest.approx((1 + 1 - 1 + 1 + 10 - 1) / 6)


def test_reward_difference_outliers_follow_iqr_rule():
    rng = np.random.default_rng(0)
    d = rng.standard_t(3, 400)
    s = M.reward_difference_stats(d, np.zeros_like(d))
    a = np.abs(d)
    q1, q3 = np.percentile(a, [25, 75])
    mask = (a > q3 + 1.5 * (q3 - q1)) | (a < q1 - 1.5 * (q3 - q1))
    assert s["n_outliers"] == int(mask.sum()) > 0
    assert s["outlier_mean"] == pytest.approx(a[mask].mean())


def test_truth_metrics():
    rng = np.random.default_rng(2)
    q = rng.uniform(0.05, 0.95, 200)
    d = np.log(q / (1 - q))
    exact = M.truth_metrics(d, np.zeros_like(d), q, 10)
    assert exact["prob_mae"] == pytest.approx(0.0, abs=1e-12)
    assert exact["ece_vs_truth_10"] == pytest.approx(0.0, abs=1e-12)
    assert exact["bayes_accuracy"] == pytest.approx(np.mean(np.maximum(q, 1 - q)))
    assert exact["true_accuracy"] == pytest.approx(exact["bayes_accuracy"])
    # an RM twice as confident as the truth, against the loop reference with soft targets
    over = M.truth_metrics(2 * d, np.zeros_like(d), q, 10)
    p2 = 1 / (1 + np.exp(-2 * d))
    assert over["prob_mae"] == pytest.approx(np.mean(np.abs(p2 - q)))
    assert over["ece_vs_truth_10"] == pytest.approx(ref_ece(2 * d, np.zeros_like(d), 10, targets=q)[0], abs=1e-12)
    assert over["ece_vs_truth_10"] > 0.05


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_bootstrap_intervals_match_a_plain_resampling_loop(strategy):
    rc, rr = random_rewards(120, seed=4)
    rc[:5] = rr[:5]  # a few ties
    out = M.bootstrap_intervals(rc, rr, n_samples=200, n_bins=10, strategy=strategy, seed=123)
    rng = np.random.default_rng(123)
    accs, eces = [], []
    for _ in range(200):
        idx = rng.integers(0, 120, size=120)
        accs.append(M.accuracy(rc[idx], rr[idx]))
        eces.append(M.pairwise_ece(rc[idx], rr[idx], 10, strategy))
    assert out["accuracy"] == pytest.approx(list(np.percentile(accs, [2.5, 97.5])), abs=1e-12)
    assert out["ece_10"] == pytest.approx(list(np.percentile(eces, [2.5, 97.5])), abs=1e-12)
    assert out["accuracy"][0] <= M.accuracy(rc, rr) <= out["accuracy"][1]
    assert out == M.bootstrap_intervals(rc, rr, n_samples=200, n_bins=10, strategy=strategy, seed=123)


def test_all_metrics_and_average():
    rc, rr = random_rewards(90, seed=9)
    q = np.full(90, 0.6)
    m = M.all_metrics(rc, rr, true_prob=q, bootstrap_samples=20)
    for k in (
        "accuracy",
        "ece_5",
        "ece_10",
        "ece_20",
        "ace_10",
        "mce_10",
        "brier",
        "nll",
        "n_pairs",
        "n_ties",
        "reward_diff",
        "intervals",
        "truth",
    ):
        assert k in m
    assert m["ece_10"] == pytest.approx(ref_ece(rc, rr, 10)[0], abs=1e-12)
    assert m["ace_10"] == pytest.approx(ref_ece(rc, rr, 10)[1], abs=1e-12)
    m2 = M.all_metrics(rc + 1, rr, bootstrap_samples=0)
    assert "intervals" not in m2 and "truth" not in m2
    avg = M.average_metrics([m, m2])
    assert avg["accuracy"] == pytest.approx((m["accuracy"] + m2["accuracy"]) / 2)
    assert avg["n_pairs"] == 180 and avg["n_sources"] == 2
    assert "truth" not in avg and "intervals" not in avg
    assert avg["reward_diff"]["mean_abs_diff"] == pytest.approx(
        (m["reward_diff"]["mean_abs_diff"] + m2["reward_diff"]["mean_abs_diff"]) / 2
    )


# ----------------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------------
def _grid_temperature(d, lo, hi, n=4001):
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), n))
    nlls = np.array([np.mean(np.logaddexp(0, -d / t)) for t in grid])
    k = int(np.argmin(nlls))
    return grid[k], nlls[k], grid


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_temperature_matches_brute_force_grid(scale):
    # labels drawn from a model that is too confident by a factor 2.5 (true margin = d / 2.5)
    rng = np.random.default_rng(int(scale * 100))
    true_margin = rng.normal(0, 1.5, 1000)
    label = rng.random(1000) < 1 / (1 + np.exp(-true_margin))
    d = np.where(label, 1, -1) * 2.5 * true_margin * scale
    fit = fit_temperature(d, np.zeros_like(d))
    t_grid, nll_grid, grid = _grid_temperature(d, 1e-3 * scale, 1e3 * scale)
    step = math.log(grid[1] / grid[0])
    assert abs(math.log(fit.temperature) - math.log(t_grid)) <= step
    assert fit.nll_after <= nll_grid + 1e-12
    assert fit.nll_after == pytest.approx(nll_at(d, fit.temperature))
    assert fit.nll_before == pytest.approx(M.nll(d, np.zeros_like(d)))
    assert fit.at_bound is None
    # derivative of the NLL in T vanishes at the optimum
    h = 1e-5 * fit.temperature
    assert abs(nll_at(d, fit.temperature + h) - nll_at(d, fit.temperature - h)) / (2 * h) < 1e-6 / scale
    # over-confident RM: the fitted temperature is well above 1 (in units of the scale)
    assert 1.5 * scale < fit.temperature < 4 * scale


def test_temperature_scales_with_rewards_and_leaves_accuracy_alone():
    rc, rr = random_rewards(500, seed=21)
    t1 = fit_temperature(rc, rr).temperature
    t7 = fit_temperature(7 * rc, 7 * rr).temperature
    assert t7 == pytest.approx(7 * t1, rel=1e-6)
    assert M.accuracy(rc / t1, rr / t1) == M.accuracy(rc, rr)
    assert M.nll(rc, rr, t1) <= M.nll(rc, rr) + 1e-12


def test_temperature_degenerate_cases():
    assert fit_temperature([0.0, 1.0], [0.0, 1.0]).temperature == 1.0  # all ties: flat NLL
    sep = fit_temperature([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # separable: T -> 0
    assert sep.at_bound == "lower" and sep.nll_after < 1e-6
    anti = fit_temperature([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])  # always wrong: T -> infinity, p -> 1/2
    assert anti.at_bound == "upper" and anti.nll_after == pytest.approx(math.log(2), abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# The `evaluate` module
# ----------------------------------------------------------------------------------------------------
ECE_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "calibration" / "ece_metric"


@pytest.fixture(scope="module")
def ece_module():
    """The metric loaded from its directory with the hub switched off (as on a machine without internet)."""
    import os

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    import evaluate

    try:
        yield evaluate.load(str(ECE_DIR))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [5, 10, 20])
def test_evaluate_module_matches_pairwise_ece(ece_module, strategy, n_bins):
    rc, rr = random_rewards(73, seed=n_bins)
    rc[:3] = rr[:3]
    out = ece_module.compute(
        chosen_rewards=rc.tolist(), rejected_rewards=rr.tolist(), n_bins=n_bins, strategy=strategy
    )
    assert out["ece"] == pytest.approx(M.pairwise_ece(rc, rr, n_bins, strategy), abs=1e-12)
    assert out["accuracy"] == pytest.approx(M.accuracy(rc, rr))


def test_evaluate_module_loads_from_the_file_and_rejects_bad_strategy(ece_module):
    import evaluate

    by_file = evaluate.load(str(ECE_DIR / "ece_metric.py"))
    rc, rr = random_rewards(20, seed=0)
    assert by_file.compute(chosen_rewards=rc, rejected_rewards=rr, temperature=2.0)["ece"] == pytest.approx(
        M.pairwise_ece(rc, rr, 10, temperature=2.0), abs=1e-12
    )
    with pytest.raises(ValueError, match="unknown bin strategy"):
        ece_module.compute(chosen_rewards=[1.0], rejected_rewards=[0.0], strategy="nope")
