"""Calibration and accuracy metrics of a reward model on preference pairs (pure functions).

Every function takes the rewards of the chosen and of the rejected responses (numpy arrays, lists or
torch tensors of any float dtype; converted once to float64 numpy) and returns plain Python floats or
dicts of them. The model's probability that the chosen response is better is the Bradley-Terry
probability p = sigmoid((r_chosen - r_rejected) / T), with temperature T = 1 unless stated.

The ECE is the paper's (MORE, Zeng et al. 2024, and its authors' `compute_ece`): every pair is used in
BOTH orderings, (p, label 1) and (1 - p, label 0); the 2N probabilities go into M bins (a, b] of equal
width on [0, 1] (p = 0 goes in the first bin), and ECE = sum_m |B_m| / 2N * |mean label - mean p| over
the bins. `strategy="quantile"` uses equal-mass bins whose edges are the percentiles of the 2N
probabilities (same (a, b] rule). ACE is the mean and MCE the maximum of the per-bin gap over the
non-empty bins.

For an even M the symmetrized ECE equals the usual top-label ECE (confidence max(p, 1 - p)) with M/2
bins on [0.5, 1] (`top_label_ece`), up to ties on bin edges; a test checks the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import expit


STRATEGIES = ("uniform", "quantile")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def to_numpy(x, name: str = "array") -> np.ndarray:
    """A 1-D float64 numpy copy of a numpy array, a sequence or a torch tensor (any dtype, any device)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; bf16 has no numpy dtype
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    return arr


def _pairs(chosen_rewards, rejected_rewards) -> tuple[np.ndarray, np.ndarray]:
    rc, rr = to_numpy(chosen_rewards, "chosen_rewards"), to_numpy(rejected_rewards, "rejected_rewards")
    if rc.shape != rr.shape:
        raise ValueError(f"chosen_rewards and rejected_rewards must have the same length, got {rc.size} and {rr.size}")
    if rc.size == 0:
        raise ValueError("no preference pairs: chosen_rewards and rejected_rewards are empty")
    bad = ~(np.isfinite(rc) & np.isfinite(rr))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {rc.size} pairs have a non-finite reward (NaN or inf), first at index "
            f"{int(np.argmax(bad))}: check the reward model's outputs"
        )
    return rc, rr


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t


def check_bins(n_bins: int, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown bin strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def reward_margins(chosen_rewards, rejected_rewards) -> np.ndarray:
    """r_chosen - r_rejected per pair (float64)."""
    rc, rr = _pairs(chosen_rewards, rejected_rewards)
    return rc - rr


def pair_probs(chosen_rewards, rejected_rewards, temperature: float = 1.0) -> np.ndarray:
    """p = sigmoid((r_chosen - r_rejected) / T): the RM's probability that the chosen response wins."""
    return expit(reward_margins(chosen_rewards, rejected_rewards) / _check_temperature(temperature))


def symmetrize(probs, targets=None) -> tuple[np.ndarray, np.ndarray]:
    """Both orderings of every pair: probabilities [p, 1 - p] and targets [t, 1 - t] (t = 1 by default)."""
    p = to_numpy(probs)
    t = np.ones_like(p) if targets is None else to_numpy(targets)
    return np.concatenate([p, 1.0 - p]), np.concatenate([t, 1.0 - t])


# --------------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------------
def bin_edges(probs, n_bins: int = 10, strategy: str = "uniform") -> np.ndarray:
    """M + 1 bin edges: equal width on [0, 1], or the percentiles of `probs` (equal mass)."""
    check_bins(n_bins, strategy)
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    return np.percentile(to_numpy(probs), np.linspace(0.0, 1.0, n_bins + 1) * 100)


def bin_ids(probs, edges) -> np.ndarray:
    """Bin index of each probability for bins (edges[k], edges[k+1]]; values <= edges[1] go in bin 0."""
    # searchsorted(side="left") on the inner edges counts the inner edges strictly below p, which puts a
    # p equal to an edge in the bin that edge closes, i.e. (a, b]; p = 0 lands in bin 0.
    return np.searchsorted(np.asarray(edges)[1:-1], to_numpy(probs), side="left")


def binned_calibration(probs, targets, n_bins: int = 10, strategy: str = "uniform", edges=None) -> dict:
    """Per-bin counts, sums of targets, mean probability and mean target, and ECE/ACE/MCE, for any
    (prob, target) items.

    Targets may be 0/1 labels or probabilities (soft labels, e.g. the true preference probability). With 0/1
    labels `target_sum` is the exact number of positive items per bin (a sum of ones in float64), so plots
    take counts from it rather than rebuilding them from the rounded mean.
    """
    p, t = to_numpy(probs), to_numpy(targets)
    if p.shape != t.shape:
        raise ValueError(f"probs and targets differ in length: {p.size} vs {t.size}")
    if p.size == 0:
        raise ValueError("no items to bin")
    edges = bin_edges(p, n_bins, strategy) if edges is None else np.asarray(edges, dtype=np.float64)
    m = len(edges) - 1
    ids = bin_ids(p, edges)
    count = np.bincount(ids, minlength=m).astype(np.float64)
    p_sum = np.bincount(ids, weights=p, minlength=m)
    t_sum = np.bincount(ids, weights=t, minlength=m)
    nonzero = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(nonzero, p_sum / np.maximum(count, 1), np.nan)
        acc = np.where(nonzero, t_sum / np.maximum(count, 1), np.nan)
    gap = np.abs(t_sum - p_sum)  # = count * |mean target - mean prob|
    per_bin = gap[nonzero] / count[nonzero]
    return {
        "edges": edges,
        "count": count,
        "target_sum": t_sum,  # per bin; with 0/1 targets an exact integer count (the k of a Wilson interval)
        "confidence": conf,
        "accuracy": acc,
        "ece": float(gap.sum() / p.size),
        "ace": float(per_bin.mean()),
        "mce": float(per_bin.max()),
    }


# --------------------------------------------------------------------------------------------------
# Calibration of the pair probabilities
# --------------------------------------------------------------------------------------------------
def pairwise_calibration(
    chosen_rewards, rejected_rewards, n_bins: int = 10, strategy: str = "uniform", temperature: float = 1.0
) -> dict:
    """ECE, ACE, MCE and the reliability-diagram data of the paper's symmetrized pair probabilities."""
    check_bins(n_bins, strategy)
    probs, labels = symmetrize(pair_probs(chosen_rewards, rejected_rewards, temperature))
    return binned_calibration(probs, labels, n_bins, strategy)


def pairwise_ece(
    chosen_rewards, rejected_rewards, n_bins: int = 10, strategy: str = "uniform", temperature: float = 1.0
) -> float:
    """The paper's ECE over both orderings of every pair (see the module docstring)."""
    return pairwise_calibration(chosen_rewards, rejected_rewards, n_bins, strategy, temperature)["ece"]


def top_label_ece(chosen_rewards, rejected_rewards, n_bins: int = 5, temperature: float = 1.0) -> float:
    """Top-label ECE: confidence max(p, 1 - p), bins (a, b] of equal width on [0.5, 1] (0.5 in the first).

    The prediction is correct when r_chosen > r_rejected, wrong when lower, and half right on a tie.
    """
    check_bins(n_bins, "uniform")
    d = reward_margins(chosen_rewards, rejected_rewards)
    p = expit(d / _check_temperature(temperature))
    conf = np.maximum(p, 1.0 - p)
    correct = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    return binned_calibration(conf, correct, edges=np.linspace(0.5, 1.0, n_bins + 1))["ece"]


def accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs with r_chosen > r_rejected; a reward tie counts one half."""
    d = reward_margins(chosen_rewards, rejected_rewards)
    return float(np.mean(np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))))


def brier_score(chosen_rewards, rejected_rewards, temperature: float = 1.0) -> float:
    """Mean (1 - p)^2 (the same over both orderings)."""
    p = pair_probs(chosen_rewards, rejected_rewards, temperature)
    return float(np.mean((1.0 - p) ** 2))


def nll(chosen_rewards, rejected_rewards, temperature: float = 1.0) -> float:
    """Mean -log sigmoid(d / T), computed stably (the Bradley-Terry loss)."""
    d = reward_margins(chosen_rewards, rejected_rewards) / _check_temperature(temperature)
    return float(np.mean(np.logaddexp(0.0, -d)))


def reward_difference_stats(chosen_rewards, rejected_rewards) -> dict:
    """Statistics of |r_chosen - r_rejected| as in the paper's Tables 4-6.

    Outliers follow the 1.5 IQR rule on |d|: outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR].
    """
    d = reward_margins(chosen_rewards, rejected_rewards)
    a = np.abs(d)
    q1, q3 = np.percentile(a, [25, 75])
    iqr = q3 - q1
    lo, hi = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    out = a[(a < lo) | (a > hi)]
    inl = a[(a >= lo) & (a <= hi)]
    return {
        "mean_abs_diff": float(a.mean()),
        "std_abs_diff": float(a.std()),
        "median_abs_diff": float(np.median(a)),
        "mean_diff": float(d.mean()),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(iqr),
        "n_outliers": int(out.size),
        "outlier_fraction": float(out.size / a.size),
        "outlier_mean": float(out.mean()) if out.size else None,
        "inlier_mean": float(inl.mean()) if inl.size else None,
    }


def truth_metrics(
    chosen_rewards,
    rejected_rewards,
    true_prob,
    n_bins: int = 10,
    strategy: str = "uniform",
    temperature: float = 1.0,
) -> dict:
    """Error against the TRUE preference probability q of every pair (synthetic benchmark).

    prob_mae = mean |p - q|; ece_vs_truth = the symmetrized ECE with q (and 1 - q) as soft targets.
    """
    p = pair_probs(chosen_rewards, rejected_rewards, temperature)
    q = to_numpy(true_prob, "true_prob")
    if q.shape != p.shape:
        raise ValueError(f"true_prob has {q.size} values for {p.size} pairs")
    if not np.all((q >= 0) & (q <= 1)):
        raise ValueError("true_prob must lie in [0, 1]")
    probs, targets = symmetrize(p, q)
    return {
        "prob_mae": float(np.mean(np.abs(p - q))),
        f"ece_vs_truth_{n_bins}": binned_calibration(probs, targets, n_bins, strategy)["ece"],
        "true_accuracy": float(np.mean(np.where(p > 0.5, q, np.where(p < 0.5, 1 - q, 0.5)))),
        "bayes_accuracy": float(np.mean(np.maximum(q, 1 - q))),
    }


def bootstrap_intervals(
    chosen_rewards,
    rejected_rewards,
    *,
    n_samples: int = 1000,
    n_bins: int = 10,
    strategy: str = "uniform",
    temperature: float = 1.0,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap intervals (pairs resampled with replacement) of accuracy and ECE.

    The ECE is biased upward on a finite sample (noise in each bin's mean only adds to |mean label - mean p|), and
    a resample, which repeats pairs, more so: the resampled ECEs sit above the point estimate, so their percentile
    interval says how much ECE moves between test samples, not where the true calibration error lies (for a
    well-calibrated RM it can start at the estimate). `ece_<M>_bias` is the bootstrap estimate of that bias,
    mean(resampled ECE) - ECE; ECE - bias is the bias-corrected estimate. Paired differences of two RMs
    (`compare.paired_bootstrap`) carry the verdicts; the bias largely cancels there.

    Returns {"accuracy": [lo, hi], "ece_<M>": [lo, hi], "ece_<M>_bias": b, "interval": "percentile",
    "n_samples": B, "level": level}.
    """
    check_bins(n_bins, strategy)
    rc, rr = _pairs(chosen_rewards, rejected_rewards)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    d = (rc - rr) / _check_temperature(temperature)
    n = d.size
    correct = np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    probs, labels = symmetrize(expit(d))
    fixed_ids = bin_ids(probs, bin_edges(probs, n_bins, "uniform")) if strategy == "uniform" else None
    rng = np.random.default_rng(seed)
    accs, eces = np.empty(n_samples), np.empty(n_samples)
    for b in range(n_samples):
        idx = rng.integers(0, n, size=n)
        items = np.concatenate([idx, idx + n])
        accs[b] = correct[idx].mean()
        p, t = probs[items], labels[items]
        ids = fixed_ids[items] if fixed_ids is not None else bin_ids(p, bin_edges(p, n_bins, strategy))
        gap = np.abs(np.bincount(ids, weights=t, minlength=n_bins) - np.bincount(ids, weights=p, minlength=n_bins))
        eces[b] = gap.sum() / items.size
    tail = (1.0 - level) / 2 * 100
    q = [tail, 100 - tail]
    ids = fixed_ids if fixed_ids is not None else bin_ids(probs, bin_edges(probs, n_bins, strategy))
    point = (
        np.abs(
            np.bincount(ids, weights=labels, minlength=n_bins) - np.bincount(ids, weights=probs, minlength=n_bins)
        ).sum()
        / probs.size
    )
    return {
        "accuracy": [float(v) for v in np.percentile(accs, q)],
        f"ece_{n_bins}": [float(v) for v in np.percentile(eces, q)],
        f"ece_{n_bins}_bias": float(eces.mean() - point),
        "interval": "percentile",
        "n_samples": int(n_samples),
        "level": float(level),
    }


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------
def all_metrics(
    chosen_rewards,
    rejected_rewards,
    *,
    n_bins: Sequence[int] = (5, 10, 20),
    strategy: str = "uniform",
    temperature: float = 1.0,
    true_prob=None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    headline_bins: int = 10,
) -> dict:
    """Every metric of one RM on one source's pairs, as a flat JSON-ready dict.

    Keys: accuracy, ece_<M> for each M in n_bins, ace_<H>, mce_<H> (H = headline_bins), brier, nll,
    n_pairs, n_ties (pairs with equal rewards), temperature, reward_diff (a dict), intervals (bootstrap,
    omitted when bootstrap_samples == 0) and truth (only when true_prob is given).
    """
    for m in list(n_bins) + [headline_bins]:
        check_bins(m, strategy)
    rc, rr = _pairs(chosen_rewards, rejected_rewards)
    t = _check_temperature(temperature)
    out: dict = {"accuracy": accuracy(rc, rr)}
    for m in n_bins:
        out[f"ece_{m}"] = pairwise_ece(rc, rr, m, strategy, t)
    head = pairwise_calibration(rc, rr, headline_bins, strategy, t)
    out[f"ece_{headline_bins}"] = head["ece"]
    out[f"ace_{headline_bins}"] = head["ace"]
    out[f"mce_{headline_bins}"] = head["mce"]
    out["brier"] = brier_score(rc, rr, t)
    out["nll"] = nll(rc, rr, t)
    out["n_pairs"] = int(rc.size)
    out["n_ties"] = int(np.sum(rc == rr))
    out["temperature"] = t
    out["reward_diff"] = reward_difference_stats(rc / t, rr / t)
    if bootstrap_samples:
        out["intervals"] = bootstrap_intervals(
            rc, rr, n_samples=bootstrap_samples, n_bins=headline_bins, strategy=strategy, temperature=t, seed=seed
        )
    if true_prob is not None:
        out["truth"] = truth_metrics(rc, rr, true_prob, headline_bins, strategy, t)
    return out


def average_metrics(per_source: Sequence[dict], *, _top: bool = True) -> dict:
    """Unweighted mean over sources of every numeric metric (nested dicts too; counts are summed)."""
    if not per_source:
        raise ValueError("nothing to average: no sources")
    out: dict = {}
    for key, first in per_source[0].items():
        if key == "intervals":
            continue
        values = [m.get(key) for m in per_source]
        if isinstance(first, dict):
            if all(isinstance(v, dict) for v in values):
                out[key] = average_metrics(values, _top=False)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            if all(isinstance(v, (int, float)) and v is not None for v in values):
                if key in ("n_pairs", "n_ties", "n_outliers"):
                    out[key] = int(sum(values))  # counts add up
                else:
                    out[key] = float(np.mean(values))
    if _top:
        out["n_sources"] = len(per_source)
    return out
