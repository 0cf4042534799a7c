"""Pairwise expected calibration error (ECE) of a reward model, as an `evaluate` metric.

Self-contained (numpy only) so that it loads anywhere with
    evaluate.load("path/to/pipeline/calibration/ece_metric")
It computes exactly `pipeline.calibration.metrics.pairwise_ece` (a test checks they agree).
"""

import datasets
import evaluate
import numpy as np


_CITATION = """\
@inproceedings{zeng2024diversified,
  title={On Diversified Preferences of Large Language Model Alignment},
  author={Zeng, Dun and Dai, Yong and Cheng, Pengyu and Wang, Longyue and Hu, Tianhao and Chen, Wanshun and Du, Nan and Xu, Zenglin},
  booktitle={Findings of the Association for Computational Linguistics: EMNLP 2024},
  year={2024}
}
"""

_DESCRIPTION = """\
Expected calibration error of a reward model on preference pairs, as defined by MORE (Zeng et al. 2024).
The model's probability that the chosen response is better is p = sigmoid((r_chosen - r_rejected) / T).
Every pair is used in both orderings, (p, label 1) and (1 - p, label 0); the 2N probabilities are put in
n_bins bins (a, b] of equal width on [0, 1] (p = 0 in the first bin), or of equal mass with
strategy="quantile" (edges = percentiles of the 2N probabilities), and
ECE = sum over bins of |B_m| / 2N * |mean label - mean probability|.
"""

_KWARGS_DESCRIPTION = """
Args:
    chosen_rewards (`list` of `float`): reward of the preferred response of each pair.
    rejected_rewards (`list` of `float`): reward of the other response, same order.
    n_bins (`int`, defaults to 10): number of bins.
    strategy (`str`, defaults to "uniform"): "uniform" (equal width) or "quantile" (equal mass).
    temperature (`float`, defaults to 1.0): rewards are divided by it (temperature scaling).
Returns:
    ece (`float`): the expected calibration error, in [0, 1].
    accuracy (`float`): fraction of pairs with r_chosen > r_rejected (ties count one half).
Examples:
    >>> ece = evaluate.load("pipeline/calibration/ece_metric")
    >>> ece.compute(chosen_rewards=[2.0, 0.5, -1.0], rejected_rewards=[0.0, 1.0, -3.0], n_bins=10)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EceMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"chosen_rewards": datasets.Value("float64"), "rejected_rewards": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/2312.07401"],
        )

    def _compute(self, chosen_rewards, rejected_rewards, n_bins=10, strategy="uniform", temperature=1.0):
        if strategy not in ("uniform", "quantile"):
            raise ValueError(f"unknown bin strategy {strategy!r}: use one of uniform, quantile")
        if int(n_bins) != n_bins or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        d = np.asarray(chosen_rewards, dtype=np.float64) - np.asarray(rejected_rewards, dtype=np.float64)
        if d.size == 0:
            raise ValueError("no preference pairs")
        if not np.all(np.isfinite(d)):
            raise ValueError("rewards must be finite")
        p = 1.0 / (1.0 + np.exp(-d / float(temperature)))
        probs = np.concatenate([p, 1.0 - p])
        labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
        if strategy == "uniform":
            edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
        else:
            edges = np.percentile(probs, np.linspace(0.0, 1.0, int(n_bins) + 1) * 100)
        ids = np.searchsorted(edges[1:-1], probs, side="left")  # bins (a, b]; p = 0 in bin 0
        gap = np.abs(
            np.bincount(ids, weights=labels, minlength=int(n_bins))
            - np.bincount(ids, weights=probs, minlength=int(n_bins))
        )
        acc = np.mean(np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5)))
        return {"ece": float(gap.sum() / probs.size), "accuracy": float(acc)}
