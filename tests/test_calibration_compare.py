"""Paired bootstrap comparisons (pipeline.calibration.compare) against a brute-force reference; the sentence rules."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import compare as C
from pipeline.calibration import metrics as M


def _rms(seed: int, sizes=(7, 5, 9)):
    rng = np.random.default_rng(seed)
    sources = ["helpful", "harmless", "webgpt"][: len(sizes)]
    a = {s: (rng.normal(size=n) * 2, rng.normal(size=n) * 2) for s, n in zip(sources, sizes)}
    b = {s: (a[s][0] + rng.normal(size=n) * 0.7, a[s][1] + rng.normal(size=n) * 0.7) for s, n in zip(sources, sizes)}
    q = {s: rng.uniform(size=n) for s, n in zip(sources, sizes)}
    return sources, a, b, q


def _brute_metrics(rc, rr, bins, strategy, t, q=None):
    """Each metric of one RM from metrics.py on explicit arrays (the reference, no per-pair terms)."""
    out = {
        f"ece_{bins}": M.pairwise_ece(rc, rr, bins, strategy),
        "accuracy": M.accuracy(rc, rr),
        "brier": M.brier_score(rc, rr),
        "nll": M.nll(rc, rr),
    }
    if t is not None:
        out.update(
            {
                f"temperature_scaled/ece_{bins}": M.pairwise_ece(rc, rr, bins, strategy, t),
                "temperature_scaled/brier": M.brier_score(rc, rr, t),
                "temperature_scaled/nll": M.nll(rc, rr, t),
            }
        )
    if q is not None:
        out["truth/prob_mae"] = M.truth_metrics(rc, rr, q, bins, strategy)["prob_mae"]
    return out


def _brute_force(a, b, sources, hh, bins, strategy, temps, q, n_samples, seed):
    """Loop over resamples: for each, slice BOTH RMs' arrays with the same drawn indices and call metrics.py."""
    diffs = {s: [] for s in sources}
    points = {}
    for j, s in enumerate(sources):
        n = len(a[s][0])
        ta, tb = temps or (None, None)
        points[s] = (_brute_metrics(*a[s], bins, strategy, ta, q[s]), _brute_metrics(*b[s], bins, strategy, tb, q[s]))
        rng = np.random.default_rng([seed, j])
        for _ in range(n_samples):
            idx = rng.integers(0, n, n)
            ma = _brute_metrics(a[s][0][idx], a[s][1][idx], bins, strategy, ta, q[s][idx])
            mb = _brute_metrics(b[s][0][idx], b[s][1][idx], bins, strategy, tb, q[s][idx])
            diffs[s].append({k: ma[k] - mb[k] for k in ma})
    out = {}
    for s in sources:
        out[s] = {}
        for k in points[s][0]:
            d = np.array([r[k] for r in diffs[s]])
            out[s][k] = (points[s][0][k], points[s][1][k], d)
    for group, members in (("all_average", sources), ("hh_average", hh)):
        out[group] = {}
        for k in points[sources[0]][0]:
            d = np.mean([out[m][k][2] for m in members], axis=0)
            out[group][k] = (np.mean([out[m][k][0] for m in members]), np.mean([out[m][k][1] for m in members]), d)
    return out


@pytest.mark.parametrize("strategy,temps", [("uniform", (0.7, 1.6)), ("quantile", None)])
def test_paired_bootstrap_matches_brute_force(strategy, temps):
    sources, a, b, q = _rms(0)
    hh = ["helpful", "harmless"]
    got = C.paired_bootstrap(
        a,
        b,
        sources=sources,
        hh=hh,
        headline_bins=5,
        strategy=strategy,
        temperatures=temps,
        true_prob=q,
        n_samples=60,
        seed=4,
    )
    ref = _brute_force(a, b, sources, hh, 5, strategy, temps, q, 60, 4)
    assert set(got) == set(ref) == {*sources, "all_average", "hh_average"}
    for group in ref:
        assert set(got[group]) == set(ref[group])
        for k, (pa, pb, d) in ref[group].items():
            e = got[group][k]
            assert e["a"] == pytest.approx(pa, abs=1e-12) and e["b"] == pytest.approx(pb, abs=1e-12)
            assert e["diff"] == pytest.approx(pa - pb, abs=1e-12)
            assert e["ci95"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])), abs=1e-12)
            p = min(1.0, 2 * min(np.mean(d <= 1e-15), np.mean(d >= -1e-15)))
            assert e["p_value"] == pytest.approx(p), (group, k)


def test_resampling_is_paired_and_chunking_does_not_change_draws(monkeypatch):
    sources, a, _, _ = _rms(1)
    # the same RM on both sides: every resampled difference is exactly 0 -> CI [0, 0], p = 1
    same = C.paired_bootstrap(a, a, sources=sources, n_samples=50, seed=0)
    for group in same.values():
        for e in group.values():
            assert e["diff"] == 0 and e["ci95"] == [0.0, 0.0] and e["p_value"] == 1.0
    # an RM that prefers the chosen side by a wide margin vs the same RM with chosen and rejected swapped
    a = {s: (a[s][0] + 3.0, a[s][1]) for s in sources}
    worse = {s: (a[s][1], a[s][0]) for s in sources}
    res = C.paired_bootstrap(a, worse, sources=sources, n_samples=200, seed=0)["all_average"]["accuracy"]
    assert res["diff"] > 0 and res["ci95"][0] > 0 and res["p_value"] < 0.05
    full = C.paired_bootstrap(a, worse, sources=sources, n_samples=40, seed=2)
    monkeypatch.setattr(C, "_CHUNK_CELLS", 9)  # one or two resamples per chunk
    chunked = C.paired_bootstrap(a, worse, sources=sources, n_samples=40, seed=2)
    flat = [(g, k, f) for g in full for k in full[g] for f in ("diff", "p_value")]  # same draws, BLAS rounding aside
    assert [chunked[g][k][f] for g, k, f in flat] == pytest.approx([full[g][k][f] for g, k, f in flat], abs=1e-12)
    np.testing.assert_allclose(
        [chunked[g][k]["ci95"] for g, k, _ in flat], [full[g][k]["ci95"] for g, k, _ in flat], atol=1e-12
    )


def test_point_values_equal_metrics_json_definitions():
    sources, a, b, _ = _rms(2, sizes=(30, 11))
    got = C.paired_bootstrap(a, b, sources=sources, headline_bins=10, temperatures=(1.3, 0.8), n_samples=0)
    for s in sources:
        ref = M.all_metrics(*a[s], n_bins=[10], bootstrap_samples=0, temperature=1.3)
        assert got[s]["temperature_scaled/ece_10"]["a"] == pytest.approx(ref["ece_10"], abs=1e-12)
        assert got[s]["temperature_scaled/nll"]["a"] == pytest.approx(ref["nll"], abs=1e-12)
        assert got[s]["ece_10"]["ci95"] is None and got[s]["ece_10"]["p_value"] is None
    avg = M.average_metrics([M.all_metrics(*b[s], bootstrap_samples=0) for s in sources])
    assert got["all_average"]["brier"]["b"] == pytest.approx(avg["brier"], abs=1e-12)
    assert "hh_average" not in got


def test_paired_bootstrap_rejects_unpaired_inputs():
    sources, a, b, _ = _rms(3)
    b["helpful"] = (b["helpful"][0][:-1], b["helpful"][1][:-1])
    with pytest.raises(ValueError, match="source 'helpful' has 7 pairs for one RM and 6"):
        C.paired_bootstrap(a, b, sources=sources, n_samples=5)


def test_win_lose_bootstrap_matches_brute_force():
    counts = {"win": 9, "tie": 4, "lose": 6, "invalid": 3}
    got = C.bootstrap_win_lose(counts, n_samples=300, seed=5)
    x = np.array([1.0] * 9 + [0.0] * 4 + [-1.0] * 6)
    rng = np.random.default_rng([5, 0])
    d = np.array([x[rng.integers(0, 19, 19)].mean() for _ in range(300)])
    assert got["n"] == 19 and got["diff"] == pytest.approx(3 / 19)
    assert got["ci95"] == pytest.approx(list(np.percentile(d, [2.5, 97.5])))
    assert got["p_value"] == pytest.approx(min(1, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    assert C.bootstrap_win_lose({"win": 0, "tie": 0, "lose": 0}) is None


def test_comparison_names_and_defaults():
    assert C.default_comparisons(["more", "multitask", "uniform", "x"]) == [
        "more vs multitask",
        "more vs uniform",
        "multitask vs uniform",
    ]
    assert C.default_comparisons(["more", "single-helpful"]) == []
    assert C.resolve_comparisons(["a  vs b"], ["a", "b"]) == {"a vs b": ("a", "b")}
    with pytest.raises(
        ValueError,
        match=r"'more vs nope' names 'nope', which this run does not evaluate; "
        r"the RMs evaluated here are: more, multitask",
    ):
        C.resolve_comparisons(["more vs nope"], ["more", "multitask"])
    with pytest.raises(ValueError, match="is not a comparison"):
        C.parse_comparison("more against multitask")
    with pytest.raises(ValueError, match="is not a comparison"):
        C.parse_comparison("more vs more")


def _entry(a, b, lo, hi, p=0.5):
    return {"a": a, "b": b, "diff": a - b, "ci95": [lo, hi], "p_value": p}


def test_sentence_calls_a_difference_only_when_the_interval_excludes_zero():
    entry = _entry(0.030, 0.048, -0.026, -0.010, 0.002)
    s = C.difference_sentence("MORE", "MultiTask", "ECE (M=10), all sources", entry)
    assert s == (
        "ECE (M=10), all sources: MORE's is lower than MultiTask's by 0.0180 (95% CI 0.0100 to 0.0260; "
        "p = 0.002): MORE is better here."
    )
    s = C.difference_sentence("MORE", "MultiTask", "ECE (M=10), all sources", _entry(0.0512, 0.0506, -0.011, 0.012))
    assert s == (
        "ECE (M=10), all sources: no significant difference between MORE and MultiTask (difference "
        "+0.0006, 95% CI -0.0110 to +0.0120; p = 0.500)."
    )
    assert "better" not in s
    # higher accuracy is better; a higher ECE makes the other RM the better one
    s = C.difference_sentence(
        "MORE",
        "MultiTask",
        "Accuracy",
        _entry(0.70, 0.65, 0.01, 0.09, 0.01),
        lower_is_better=False,
        scale=100,
        digits=2,
        unit=" points",
    )
    assert s.startswith("Accuracy: MORE's is higher than MultiTask's by 5.00 points (95% CI 1.00 to 9.00")
    assert s.endswith("MORE is better here.")
    s = C.difference_sentence("MORE", "MultiTask", "ECE", _entry(0.06, 0.05, 0.002, 0.02, 0.01))
    assert "MORE's is higher than MultiTask's" in s and s.endswith("MultiTask is better here.")
    # an interval touching 0 is not significant; no interval gives no verdict
    assert "no significant difference" in C.difference_sentence("a", "b", "x", _entry(0.1, 0.0, 0.0, 0.2))
    assert "(95% CI 0.0500 to 0.1500; p < 0.001): a is better" in C.difference_sentence(
        "a", "b", "x", _entry(0.0, 0.1, -0.15, -0.05, 0.0)
    )
    s = C.difference_sentence("a", "b", "x", {"a": 0.1, "b": 0.0, "diff": 0.1, "ci95": None, "p_value": None})
    assert "no verdict" in s and "better" not in s


def test_win_lose_sentence_rules():
    entry = {"win": 0.45, "tie": 0.2, "lose": 0.35, "n": 100}
    s = C.win_lose_sentence("rjs: more vs multitask", entry, {"diff": 0.10, "ci95": [-0.03, 0.23], "p_value": 0.1})
    assert s == (
        "rjs: more vs multitask: win 45% / tie 20% / lose 35% of 100 prompts; no significant difference "
        "between the two policies (win - lose +10.0 points, 95% CI -3.0 to +23.0; p = 0.100)."
    )
    s = C.win_lose_sentence("x", entry, {"diff": 0.10, "ci95": [0.02, 0.2], "p_value": 0.01})
    assert "the first policy wins more often than it loses (win - lose +10.0 points, 95% CI +2.0 to +20.0; " in s
    s = C.win_lose_sentence("x", entry, {"diff": -0.10, "ci95": [-0.2, -0.02], "p_value": 0.01})
    assert "loses more often than it wins" in s
    assert C.win_lose_sentence("x", {"win": None, "tie": None, "lose": None}, None) == "x: no verdicts."


def test_render_comparisons_marks_significant_cells():
    comps = {
        "more vs multitask": {
            "helpful": {"ece_10": _entry(0.03, 0.05, -0.03, -0.01), "accuracy": _entry(0.6, 0.59, -0.02, 0.04)}
        }
    }
    md = C.render_comparisons(comps, 100)
    assert "| helpful | -0.0200 [-0.0300, -0.0100] p = 0.500 | +1.00 [-2.00, +4.00] p = 0.500 |" in md  # p too big
    comps["more vs multitask"]["helpful"]["ece_10"]["p_value"] = 0.004
    md = C.render_comparisons(comps, 100)
    assert "| helpful | -0.0200 [-0.0300, -0.0100] p = 0.004 * | +1.00 [-2.00, +4.00] p = 0.500 |" in md
    assert "| *better* | lower is better | higher is better |" in md


def test_significance_rule_boundaries():
    """One rule everywhere: the interval excludes 0 (touching 0 does not) AND p < 0.05 strictly."""
    import pipeline.sweep as S
    from pipeline.stats import t_test_p

    assert C.is_significant(0.002, 0.034, 0.024) is True
    assert C.is_significant(0.002, 0.034, 0.05) is False  # p = 0.050 is not significant
    assert C.is_significant(0.002, 0.034, 0.0499) is True
    assert C.is_significant(0.0, 0.034, 0.01) is False  # an interval touching 0 does not exclude it
    assert C.is_significant(-0.034, 0.0, 0.01) is False
    assert C.is_significant(-0.034, -0.001, 0.01) is True
    assert C.is_significant(None, None, 0.01) is None and C.is_significant(0.1, 0.2, None) is None
    assert C.significant(_entry(0.1, 0.0, 0.01, 0.2, 0.05)) is False
    assert C.significant({"diff": 0.1, "ci95": None, "p_value": None}) is False
    # the sweep's seed-paired rows go through the same function (p stored, or from mean, sd, n)
    row = {"mean": 0.02, "sd": 0.01, "n": 3, "low": 0.001, "high": 0.04}
    assert S.is_significant({**row, "p_value": 0.05}) is False
    assert S.is_significant({**row, "p_value": 0.049}) is True
    assert S.is_significant({**row, "low": 0.0, "p_value": 0.01}) is False
    # without a stored p (older summaries) the paired t-test's p is recomputed: here t = 0.02 / (0.01 / sqrt 3)
    from scipy import stats

    assert t_test_p(0.02, 0.01, 3) == pytest.approx(stats.ttest_1samp([0.01, 0.02, 0.03], 0.0).pvalue)
    assert S.is_significant(row) is (t_test_p(0.02, 0.01, 3) < 0.05)


def test_direction_labels():
    assert C.direction("ece_10") == C.direction("temperature_scaled/ece_10") == "lower"
    assert C.direction("brier") == C.direction("nll") == C.direction("ts_nll") == "lower"
    assert C.direction("truth/prob_mae") == C.direction("truth_gold/prob_mae") == C.direction("gold_mae") == "lower"
    assert C.direction("accuracy") == "higher" and C.direction("temperature") == "closer to 1"
    assert C.direction("something_else") is None
    assert C.DIRECTION_TEXT["lower"] == "lower is better"


def test_comparisons_summary_names_every_significant_difference():
    """The issue's case: the prose said 'no significant difference' while the table held a significant Brier
    difference +0.018 [0.002, 0.034], p = 0.024. The closing paragraph names it, and every other significant
    cell (per source too), and leaves out p = 0.050 and an interval touching 0."""
    comps = {
        "more vs multitask": {
            "helpful": {
                "ece_10": _entry(0.03, 0.05, -0.03, -0.01, 0.004),
                "accuracy": _entry(0.62, 0.60, 0.005, 0.035, 0.01),
                "brier": _entry(0.2, 0.19, 0.0, 0.02, 0.01),  # touches 0
            },
            "all_average": {
                "ece_10": _entry(0.04, 0.05, -0.02, -0.001, 0.05),  # p = 0.050
                "accuracy": _entry(0.6, 0.6, -0.02, 0.02, 0.9),
                "brier": _entry(0.2, 0.182, 0.002, 0.034, 0.024),
            },
        },
        "more vs uniform": {"all_average": {"nll": _entry(0.6, 0.65, -0.08, -0.02, 0.001)}},
    }
    md = C.render_comparisons(comps, 1000)
    summary = md.strip().splitlines()[-1]
    assert summary.startswith("Summary: 4 of the 7 differences tested are significant")
    assert (
        "more vs multitask, brier (all_average): more higher by 0.0180 [0.0020, 0.0340], p = 0.024, multitask better"
        in summary
    )
    assert (
        "more vs multitask, ece_10 (helpful): more lower by 0.0200 [0.0100, 0.0300], p = 0.004, more better" in summary
    )
    assert "accuracy (helpful): more higher by 2.00 [0.50, 3.50] points, p = 0.010, more better" in summary
    assert "more vs uniform, nll (all_average): more lower by 0.0500" in summary
    assert "ece_10 (all_average)" not in summary and "brier (helpful)" not in summary
    assert "none of the 1 differences" in C.render_comparisons({"a vs b": {"x": {"nll": _entry(1, 1, -1, 1, 1)}}}, 10)
