"""scripts/downstream_report.py (issue 31): every number of the downstream section recomputed by brute force
from the per-seed values the summaries hold, the summaries themselves built by the sweep's own aggregation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

from pipeline.sweep.aggregation import aggregate_point


REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_downstream_report", REPO / "scripts" / "downstream_report.py")
D = importlib.util.module_from_spec(spec)
spec.loader.exec_module(D)

RMS = ("more", "multitask", "uniform")


def _runs(rng, shift: float = 0.0) -> dict[int, list[tuple]]:
    """collect_run-style rows of five seeds: calibration, best-of-N gold per N, RJS, a judged comparison."""
    per_seed = {}
    for seed in range(5):
        base = float(rng.normal(-0.3, 0.05))
        rows = [("align", "base", "all", "gold_reward", base)]
        for i, rm in enumerate(RMS):
            ece = float(rng.uniform(0.02, 0.09))
            rows += [
                ("calibration", rm, "all_average", "ece_10", ece),
                ("calibration", rm, "all_average", "temperature", float(rng.uniform(0.7, 2.0))),
                ("align", f"{rm}/rjs", "all", "gold_reward", base + float(rng.normal(0.05, 0.05))),
            ]
            for n in (4, 16, 64):
                gain = 0.3 - 2.0 * ece + 0.02 * i + shift + float(rng.normal(0, 0.03)) - 0.001 * n
                rows.append(("align", f"{rm}/best_of_n@{n}", "all", "gold_reward", base + gain))
        rows += [
            ("judge", "more/rjs vs more/best_of_n", "all", "win_rate", float(rng.uniform(0.2, 0.4))),
            ("judge", "more/rjs vs more/best_of_n", "all", "lose_rate", float(rng.uniform(0.2, 0.4))),
            ("judge", "more/rjs vs more/best_of_n", "all", "gold_diff", float(rng.normal(-0.05, 0.02))),
        ]
        per_seed[seed] = rows
    return per_seed


def _summary(points: dict[str, dict]) -> dict:
    out = {"sweep": {}, "points": {}}
    for name, per_seed in points.items():
        key, _, value = name.partition("=")
        out["points"][name] = {"grid": {key: value}, "n_runs": len(per_seed), **aggregate_point(per_seed)}
    return out


@pytest.fixture
def results(tmp_path):
    rng = np.random.default_rng(3)
    raw = {
        "downstream": {"drift_scale=0": _runs(rng), "drift_scale=2": _runs(rng)},
        "downstream-overconfident": {"drift_scale=0": _runs(rng), "drift_scale=2": _runs(rng)},
        "two-source": {"normalize=l2": _runs(rng), "normalize=none": _runs(rng, shift=0.05)},
    }
    for part, points in raw.items():
        (tmp_path / part).mkdir()
        (tmp_path / part / "summary.json").write_text(json.dumps(_summary(points)))
    return tmp_path, raw


def _value(rows, section, name, metric="gold_reward", scope="all"):
    return next(v for s, n, sc, m, v in rows if (s, n, sc, m) == (section, name, scope, metric))


def test_observations_and_correlations_equal_a_brute_force_recomputation(results):
    path, raw = results
    rows = D.observations(D.load(path))
    assert len(rows) == 2 * 2 * 5 * 3
    expect = []
    for part in ("downstream", "downstream-overconfident"):
        for point, per_seed in raw[part].items():
            for seed, rs in per_seed.items():
                base = _value(rs, "align", "base")
                for rm in RMS:
                    gain = _value(rs, "align", f"{rm}/best_of_n@16") - base
                    ece = _value(rs, "calibration", rm, "ece_10", "all_average")
                    expect.append((part, point, str(seed), rm, ece, gain))
    got = [(r["part"], r["point"], r["seed"], r["rm"], r["ece_10"], r["gain"]) for r in rows]
    assert sorted(got) == sorted(expect)
    x = np.array([e[4] for e in expect])
    y = np.array([e[5] for e in expect])
    pooled = D.block_bootstrap_r(rows, "ece_10", "gain", within=False)
    assert pooled["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pooled["low"] <= pooled["r"] <= pooled["high"] and pooled["blocks"] == 20
    # within blocks: each (part, point, seed)'s three RMs centred on their own mean
    xs, ys = [], []
    for key in sorted({e[:3] for e in expect}):
        blk = [e for e in expect if e[:3] == key]
        xs += list(np.array([e[4] for e in blk]) - np.mean([e[4] for e in blk]))
        ys += list(np.array([e[5] for e in blk]) - np.mean([e[5] for e in blk]))
    within = D.block_bootstrap_r(rows, "ece_10", "gain", within=True)
    assert within["r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)
    assert within["r"] < -0.5 and within["high"] < 0  # the planted relation: lower ECE, larger gain


def test_the_section_reports_gold_tables_methods_and_the_two_source_difference(results):
    path, raw = results
    lines, numbers = D.render(path)
    text = "\n".join(lines)
    assert (path / "downstream" / "plot_ece_vs_gain.png").stat().st_size > 10_000
    # best-of-16 gold of MORE at drift 2: the mean over seeds
    more16 = np.mean([_value(rs, "align", "more/best_of_n@16") for rs in raw["downstream"]["drift_scale=2"].values()])
    assert f"{more16:.4f}" in text
    # MORE - MultiTask at best-of-64, drift 0: the seed-paired t-test
    a = [_value(rs, "align", "more/best_of_n@64") for rs in raw["downstream"]["drift_scale=0"].values()]
    b = [_value(rs, "align", "multitask/best_of_n@64") for rs in raw["downstream"]["drift_scale=0"].values()]
    p = ttest_rel(a, b).pvalue
    assert f"{np.mean(np.subtract(a, b)):+.4f}" in text and (f"p = {p:.3f}" in text or p < 0.001)
    assert "| more/rjs vs more/best_of_n |" in text
    # two sources: MORE(none) - MORE(l2), best-of-16, seed-paired across the two points
    none = [_value(rs, "align", "more/best_of_n@16") for rs in raw["two-source"]["normalize=none"].values()]
    l2 = [_value(rs, "align", "more/best_of_n@16") for rs in raw["two-source"]["normalize=l2"].values()]
    d = np.subtract(none, l2)
    line = next(ln for ln in lines if ln.startswith("| gold reward, best-of-16 |"))
    assert f"{d.mean():+.4f}" in line and f"p = {ttest_rel(none, l2).pvalue:.3f}" in line
    assert "rloo-temperature" in text and "Not run yet" in text  # the part without a summary says so
    assert numbers["correlation"]["ece_10_within"]["n"] == 60


def test_readme_lines_name_each_part_and_the_correlation(results):
    path, _ = results
    lines = D.readme_lines(path)
    assert any(
        ln.startswith("- **Downstream, `downstream`**, MORE - MultiTask gold reward: best-of-4") for ln in lines
    )
    assert any(ln.startswith("- **Calibration vs gain**") for ln in lines)
    assert D.readme_lines(path / "nothing") == [
        f"- **Downstream, `{p}`**: not run; `scripts/run_study.sh {p}` produces it."
        for p in ("downstream", "downstream-overconfident", "two-source")
    ]
