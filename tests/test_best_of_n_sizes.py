"""Issue 31: best-of-N at several N from nested subsets of one draw (align.best_of_n_sizes)."""

import numpy as np
import pytest

from pipeline.align.config import AlignConfig
from pipeline.align.judging import gold_at
from pipeline.align.methods import best_of_n_records, nested_picks


def test_nested_picks_are_the_best_of_each_prefix_first_on_ties_and_n_is_the_usual_pick():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        scores = rng.integers(0, 4, size=n).astype(float)  # many ties
        cands = [f"c{i}" for i in range(n)]
        sizes = sorted({int(k) for k in rng.integers(1, n + 1, size=3)} | {n})
        picks = nested_picks(cands, scores, sizes)["responses_at"]
        for k in sizes:  # brute force: the first index holding the prefix's maximum
            best = max(range(k), key=lambda i: (scores[i], -i))
            assert picks[str(k)] == cands[best]
        chosen = best_of_n_records(["p"], [cands], scores[None, :])[0]["chosen"]
        assert picks[str(n)] == cands[chosen]
        values = [max(scores[:k]) for k in sizes]
        assert values == sorted(values)  # a larger N never picks a lower-scored response
    assert nested_picks(["a"], [1.0], []) == {}


def test_gold_at_summarises_each_size_over_the_records():
    records = [
        {"prompt": "p1", "responses_at": {"1": "x", "2": "yy"}},
        {"prompt": "p2", "responses_at": {"1": "zzz", "2": "zzz"}},
    ]
    out = gold_at(records, lambda prompts, responses: np.array([float(len(r)) for r in responses]))
    assert out["1"]["mean"] == pytest.approx(2.0) and out["2"]["mean"] == pytest.approx(2.5)
    assert out["1"]["n"] == 2


def test_sizes_above_n_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"align.best_of_n_sizes \[16\] exceed align.n = 4"):
        AlignConfig(n=4, best_of_n_sizes=[2, 16])
    assert AlignConfig(n=16, best_of_n_sizes=[4, 16]).best_of_n_sizes == [4, 16]


def test_rjs_n_above_n_is_refused():
    with pytest.raises(ValueError, match=r"align.rjs_n = 8 exceeds align.n = 4"):
        AlignConfig(n=4, rjs_n=8)
    assert AlignConfig(n=64, rjs_n=4).rjs_n == 4


def test_an_llm_judge_budget_counts_a_comparison_of_named_policies_once(tmp_path):
    from types import SimpleNamespace

    from pipeline.align.judging import planned_requests

    align = AlignConfig(
        methods=["best_of_n", "rjs"],
        judge={"kind": "openai", "model": "m", "base_url": "http://localhost:1/v1", "api_key_env": ""},
        comparisons=["more vs multitask", "more vs base", "more/rjs vs more/best_of_n"],
        eval_sources=["helpful", "harmless"],
        n_eval_prompts=10,
    )
    plan = planned_requests(SimpleNamespace(align=align), tmp_path)
    assert plan["comparisons"] == (2 * 2 + 1) * 2 * 10 and plan["requests"] == 2 * plan["comparisons"]
    assert plan["how"].startswith("(2 method(s) x 2 comparison(s) + 1 of named policies) x 2 prompt set(s)")


def test_a_sweep_summary_reports_the_seed_paired_gold_difference_of_a_judged_comparison():
    from scipy.stats import ttest_1samp

    from pipeline.sweep.aggregation import aggregate_point
    from pipeline.sweep.summary import _index, _judgement_table

    diffs = [0.12, 0.08, 0.15, 0.11, 0.09]
    per_seed = {
        s: [
            ("judge", "more/rjs vs more/best_of_n", "all", "win_rate", 0.5),
            ("judge", "more/rjs vs more/best_of_n", "all", "lose_rate", 0.2),
            ("judge", "more/rjs vs more/best_of_n", "all", "gold_diff", d),
        ]
        for s, d in enumerate(diffs)
    }
    metrics = aggregate_point(per_seed)["metrics"]
    text = "\n".join(_judgement_table(metrics, _index(metrics)))
    assert "gold reward a - b (seed-paired)" in text and "a better" in text
    assert f"p = {ttest_1samp(diffs, 0).pvalue:.3f}" in text or ttest_1samp(diffs, 0).pvalue < 0.001
