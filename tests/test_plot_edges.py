"""Property tests of every interval, binning and plot helper at the floating-point edges: k = 0, k = n, ties,
one item, n up to 10^6, huge rewards, negative or non-finite values in an aggregate.

The arrays handed to matplotlib are tested apart from rendering (many examples, fast); each plot function is
then rendered on a few extreme inputs (few examples: a render takes ~0.5 s). Regression: the README's first
command crashed in the reliability diagram (`wilson_interval(29, 29)` gave an upper end of 1 - 1.1e-16, so
the error bar hi - y was negative), and `pipeline.sweep --aggregate` crashed on a negative exported ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import sweep as S
from pipeline.calibration import metrics as M
from pipeline.calibration import plots as P
from pipeline.io import atomic_write_json
from pipeline.stats import Z95, wilson_interval
from pipeline.sweep.plots import _finite


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RENDER = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------
# Wilson interval


@st.composite
def counts(draw, max_n: int = 10**6):
    n = draw(st.one_of(st.integers(1, 40), st.integers(1, max_n), st.sampled_from([1, 2, 29, 10**6])))
    k = draw(st.one_of(st.integers(0, n), st.sampled_from([0, n, n // 2, 1 % (n + 1), max(0, n - 1)])))
    return k, n


def _bisect(f, a: float, b: float) -> float:
    """The root of f on [a, b] (f(a), f(b) of opposite signs) by 200 bisections: float64 precision."""
    fa = f(a)
    for _ in range(200):
        m = (a + b) / 2
        if (f(m) > 0) == (fa > 0):
            a, fa = m, f(m)
        else:
            b = m
    return (a + b) / 2


@FAST
@given(counts())
def test_wilson_interval_is_ordered_exact_at_the_ends_and_mirrored(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    p = k / n
    assert 0.0 <= lo <= p <= hi <= 1.0  # exactly, in floating point: error bars p - lo, hi - p are >= 0
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)
    mlo, mhi = wilson_interval(n - k, n)
    assert mlo == pytest.approx(1.0 - hi, abs=1e-15) and mhi == pytest.approx(1.0 - lo, abs=1e-15)


@FAST
@given(counts(max_n=2000))
def test_wilson_interval_equals_the_inverted_score_test(kn):
    """Independent reference: the interval is {p : (k/n - p)^2 <= z^2 p (1 - p) / n}; find its ends by
    bisection of that quadratic on [0, k/n] and [k/n, 1]."""
    k, n = kn
    p, z = k / n, Z95

    def f(q):
        return (p - q) ** 2 - z * z * q * (1 - q) / n

    lo_ref = 0.0 if k == 0 else _bisect(f, 0.0, p)
    hi_ref = 1.0 if k == n else _bisect(f, p, 1.0)
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(lo_ref, abs=1e-12) and hi == pytest.approx(hi_ref, abs=1e-12)


def test_wilson_interval_edge_cases_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no observation: every proportion
    assert wilson_interval(29, 29)[1] == 1.0  # the README's crash: it was 1 - 1.1e-16
    assert wilson_interval(np.int64(3), np.int64(7)) == wilson_interval(3, 7)
    lo, hi = wilson_interval(8, 10, z=1.96)  # hand-computed: center 0.71674, half 0.22658
    assert lo == pytest.approx(0.71674 - 0.22658, abs=1e-5) and hi == pytest.approx(0.71674 + 0.22658, abs=1e-5)
    for k, n in ((-1, 5), (6, 5), (0, -1)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)
    with pytest.raises(TypeError):
        wilson_interval(2.5, 5)  # a count, not a rounded float
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 2, z=float("nan"))


# ---------------------------------------------------------------------------------------------------
# Binning and the reliability diagram's points

EDGE_PROBS = [0.0, 1.0, 0.1, 0.5, 0.9, 0.3, 1e-300, 1 - 1e-16]
probs = st.lists(st.one_of(st.sampled_from(EDGE_PROBS), st.floats(0.0, 1.0)), min_size=1, max_size=200)
rewards = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
reward_pairs = st.lists(
    st.tuples(st.one_of(rewards, st.sampled_from([0.0, 1.0, -1.0, 1e300])), rewards), min_size=1, max_size=120
)


@FAST
@given(probs, st.data(), st.integers(1, 25), st.sampled_from(["uniform", "quantile"]))
def test_binning_counts_every_item_once_with_exact_label_counts(ps, data, m, strategy):
    labels = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=len(ps), max_size=len(ps)))
    cal = M.binned_calibration(ps, labels, m, strategy)
    edges = cal["edges"]
    ids = M.bin_ids(ps, edges)
    # brute force: bin i holds (edges[i], edges[i+1]]; anything at or below edges[1] is in bin 0
    for p, i in zip(ps, ids):
        assert (i == 0 or p > edges[i]) and (i == m - 1 or p <= edges[i + 1])
    assert cal["count"].sum() == len(ps)
    for i in range(m):
        members = [lab for lab, j in zip(labels, ids) if j == i]
        assert cal["count"][i] == len(members) and cal["target_sum"][i] == sum(members)
    assert cal["ece"] == pytest.approx(
        sum(
            abs(sum(lab for lab, j in zip(labels, ids) if j == i) - sum(p for p, j in zip(ps, ids) if j == i))
            for i in range(m)
        )
        / len(ps),
        abs=1e-12,
    )


@FAST
@given(reward_pairs, st.integers(1, 20), st.floats(0.05, 20.0))
def test_reliability_points_are_finite_ordered_and_count_exactly(pairs, m, t):
    rc = np.array([a for a, _ in pairs])
    rr = np.array([b for _, b in pairs])
    with np.errstate(over="ignore"):
        cal = M.pairwise_calibration(rc, rr, m, "uniform", t)
        pts = P.reliability_points(cal, offset=0.01)
        d = rc - rr
    for key in ("x", "y", "low", "high"):
        assert np.all(np.isfinite(pts[key])), key
    assert np.all(pts["low"] <= pts["y"]) and np.all(pts["y"] <= pts["high"])
    assert np.all(pts["low"] >= 0) and np.all(pts["high"] <= 1)
    assert int(pts["n"].sum()) == 2 * len(pairs)  # both orderings of every pair
    # brute force from the pairs: each ordering (p, 1) and (1 - p, 0); the label-1 items of a bin are k
    with np.errstate(over="ignore"):
        p = 1 / (1 + np.exp(-d / t))
    items = [(q, 1.0) for q in p] + [(1 - q, 0.0) for q in p]
    ids = M.bin_ids([q for q, _ in items], cal["edges"])
    k_ref = [int(sum(lab for (_, lab), j in zip(items, ids) if j == i)) for i in range(m)]
    n_ref = [int(sum(1 for j in ids if j == i)) for i in range(m)]
    assert pts["k"].tolist() == [k for k, n in zip(k_ref, n_ref) if n] and pts["n"].tolist() == [n for n in n_ref if n]
    assert np.array_equal(pts["y"], pts["k"] / pts["n"])


def test_reliability_points_refuse_soft_targets():
    cal = M.binned_calibration([0.2, 0.7], [0.3, 0.6], 2)
    with pytest.raises(ValueError, match="0/1 labels"):
        P.reliability_points(cal)


@FAST
@given(
    st.lists(
        st.lists(
            st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e308, -1e308])),
            max_size=30,
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 60),
)
def test_histogram_edges_are_finite_increasing_and_span_every_finite_value(arrays, bins):
    edges = P.histogram_edges([np.array(a, dtype=np.float64) for a in arrays], bins)
    assert edges.shape == (bins + 1,) and np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)
    finite = [x for a in arrays for x in a if math.isfinite(x)]
    if finite:
        assert edges[0] <= min(finite) and max(finite) <= edges[-1]


# ---------------------------------------------------------------------------------------------------
# Sweep plot arrays: summaries with None, NaN, inf, strings and values outside a metric's range

summary_values = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.05, 0.0, 1e300, "x", True])
)


@FAST
@given(
    st.lists(
        st.fixed_dictionaries({"mean": summary_values, "low": summary_values, "high": summary_values}), max_size=6
    )
)
def test_band_arrays_hold_only_finite_numbers(rows):
    xs = list(range(len(rows)))
    x, y, lo, hi = S.band_arrays(xs, [*rows[:-1], None] if rows else [], scale=100.0)
    assert len(x) == len(y) == len(lo) == len(hi)
    for a in (x, y, lo, hi):
        assert a.dtype == np.float64 and np.all(np.isfinite(a))


@FAST
@given(
    st.fixed_dictionaries(
        {
            "mean": summary_values,
            "low": summary_values,
            "high": summary_values,
            "values": st.dictionaries(st.sampled_from(["0", "1", "2"]), summary_values),
        }
    )
)
def test_seed_bar_holds_only_finite_numbers(row):
    bar = S.seed_bar(row, 100.0)
    if bar is None:
        assert _finite(row["mean"]) is None
        return
    assert math.isfinite(bar["mean"]) and np.all(np.isfinite(bar["values"]))
    assert (bar["low"] is None) == (bar["high"] is None)
    if bar["low"] is not None:
        assert math.isfinite(bar["low"]) and math.isfinite(bar["high"])


# ---------------------------------------------------------------------------------------------------
# Rendering every plot function on extreme inputs


def _rewards(draw_pairs: list, sources: int = 2) -> dict:
    out: dict = {}
    for r, rm in enumerate(("more", "multitask")):
        out[rm] = {}
        for s in range(sources):
            pairs = draw_pairs[(r + s) % len(draw_pairs)]
            out[rm][f"source{s}"] = (np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]))
    return out


EXTREME_PAIRS = [
    [(0.0, 0.0)],  # one pair, a tie
    [(1.0, 0.0)] * 29,  # the README's crash: every item in one bin, k = n
    [(5.0, 5.0)] * 40,  # all ties
    [(1e300, -1e300), (-1e300, 1e300), (0.0, 1e-300)],  # huge rewards: margins overflow to +-inf
    [(float(i), float(-i)) for i in range(100)],
]


@RENDER
@given(
    st.lists(st.sampled_from(EXTREME_PAIRS), min_size=1, max_size=3),
    st.integers(1, 20),
    st.sampled_from(["uniform", "quantile"]),
)
def test_reliability_diagram_and_histograms_render_extreme_inputs(tmp_path_factory, chosen, m, strategy):
    out = tmp_path_factory.mktemp("plots")
    rewards = _rewards(chosen)
    with np.errstate(over="ignore"):
        P.reliability_diagram(rewards, out / "rel.png", n_bins=m, strategy=strategy, temperatures={"more": 2.0})
        P.reward_difference_histograms(rewards, out / "hist.png")
    assert _png(out / "rel.png") and _png(out / "hist.png")


def test_one_source_with_one_pair_renders(tmp_path):
    rewards = {"more": {"helpful": (np.array([0.3]), np.array([0.1]))}}
    P.reliability_diagram(rewards, tmp_path / "rel.png")
    P.reward_difference_histograms(rewards, tmp_path / "hist.png")
    assert _png(tmp_path / "rel.png") and _png(tmp_path / "hist.png")


@RENDER
@given(
    st.dictionaries(
        st.sampled_from(["helpful", "harmless", "x"]),
        st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), max_size=40),
        max_size=3,
    )
)
def test_weight_trajectories_render_empty_flat_and_nan(tmp_path_factory, traj):
    out = tmp_path_factory.mktemp("w") / "w.png"
    P.more_weight_trajectories({s: (list(range(len(v))), v) for s, v in traj.items()}, out, title="t")
    assert _png(out)


@RENDER
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([np.nan, 0.0, 1e300, -1.0]))
def test_heatmap_renders_nan_constant_and_huge_matrices(tmp_path_factory, r, c, fill):
    out = tmp_path_factory.mktemp("h") / "h.png"
    m = np.full((r, c), fill)
    m[0, 0] = 0.5 if fill != 0.5 else 0.1
    P.heatmap(m, [f"r{i}" for i in range(r)], [f"c{j}" for j in range(c)], out, title="t")
    P.heatmap(np.full((r, c), np.nan), [f"r{i}" for i in range(r)], [f"c{j}" for j in range(c)], out, title="t")
    assert _png(out)


def _rows(values: dict) -> dict:
    """Per-seed rows of a seeds-only sweep: {seed: [(section, rm, scope, metric, value)]}."""
    return {
        s: [("calibration", rm, "all_average", metric, v) for (rm, metric), v in per.items()]
        for s, per in values.items()
    }


@pytest.mark.parametrize(
    "ece",
    [
        (-0.05, -0.01),  # the sweep crash: a negative exported ECE (the clipped interval misses the mean)
        (float("nan"), 0.02),
        (float("inf"), 0.02),
        (1e300, 1e300),
        (0.03, 0.03),  # sd 0
    ],
)
def test_sweep_plots_render_impossible_and_non_finite_aggregates(tmp_path, ece):
    per_seed = {
        s: {("more", "ece_10"): e, ("multitask", "ece_10"): 0.1, ("more", "accuracy"): 0.6} for s, e in enumerate(ece)
    }
    agg = S.aggregate_point(_rows(per_seed))
    seeds = {
        "sweep": {"recipe": "tiny-cpu", "seeds": [0, 1], "grid": []},
        "confidence": 0.95,
        "points": {"default": {"grid": {}, "runs": {}, "n_runs": 2, **agg}},
    }
    assert S.write_plots(tmp_path, seeds) == ["plot_seeds.png"] and _png(tmp_path / "plot_seeds.png")
    grid = {
        "sweep": {"recipe": "tiny-cpu", "seeds": [0, 1], "grid": [["data.synthetic.drift_scale", ["0", "2"]]]},
        "confidence": 0.95,
        "points": {
            f"drift_scale={v}": {"grid": {"data.synthetic.drift_scale": v}, "runs": {}, "n_runs": 2, **agg}
            for v in ("0", "2")
        },
    }
    written = S.write_plots(tmp_path, grid)
    assert written and all(_png(tmp_path / w) for w in written)


def test_aggregate_with_a_negative_exported_ece_writes_summary_and_plots(tmp_path):
    """The whole --aggregate path on run folders whose metrics hold a negative ECE (it crashed in the plot)."""
    atomic_write_json(
        tmp_path / S.SWEEP_FILE,
        {
            "recipe": "tiny-cpu",
            "seeds": [0, 1],
            "stages": "reward,calibration",
            "grid": [],
            "overrides": [],
            "points": S.grid_points([]),
            "runs": [],
        },
    )
    for seed, e in enumerate((-0.05, -0.01)):
        block = {"accuracy": 0.6, "ece_10": e, "brier": 0.2, "nll": 0.6, "temperature": 1.0}
        metrics = {
            rm: {"helpful": block, "all_average": {**block, "sources": ["helpful"]}} for rm in ("more", "multitask")
        }
        cal = tmp_path / "default" / f"seed-{seed}" / "calibration"
        atomic_write_json(cal / "metrics.json", metrics)
        atomic_write_json(cal / "config.json", {"headline_bins": 10})
    summary = S.aggregate(tmp_path, verify=False)
    assert summary["points"]["default"]["n_runs"] == 2
    assert (tmp_path / "summary.md").exists() and _png(tmp_path / "plot_seeds.png")
