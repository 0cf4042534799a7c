"""`pipeline.sweep`: the across-seed statistics (hand-computed values, scipy), the sweep definition (seeds,
grid, point names, every seed field), aggregation of fake run directories with known numbers, and one
real 2-seed sweep of the tiny recipe that is interrupted and resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import pipeline.sweep as S
from pipeline.calibration.compare import direction
from pipeline.config import RecipeError, load_recipe, recipe_to_dict
from pipeline.io import atomic_write_json
from pipeline.stats import paired_differences, t_interval
from tests.helpers import calls, fakes_env, set_stage_run, torchrun_fakes, write_fakes


T975 = {2: 12.706204736174707, 3: 4.302652729911275, 4: 3.182446305284263}  # t_{0.975, n-1} from tables


# ---------------------------------------------------------------------------------------------------
# Statistics


def test_t_interval_matches_hand_computed_values():
    r = t_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5.0 / 3.0)  # sum of squares 5, n - 1 = 3
    half = T975[4] * sd / 2.0
    assert r["n"] == 4 and r["mean"] == 2.5
    assert r["sd"] == pytest.approx(sd, rel=1e-12)
    assert (r["low"], r["high"]) == (pytest.approx(2.5 - half, rel=1e-12), pytest.approx(2.5 + half, rel=1e-12))
    assert r["low"] == pytest.approx(0.445739, abs=1e-6) and r["high"] == pytest.approx(4.554261, abs=1e-6)


def test_t_interval_matches_scipy_and_edge_cases():
    from scipy import stats

    xs = [0.051, 0.047, 0.062, 0.039, 0.058]
    r = t_interval(xs, confidence=0.9)
    lo, hi = stats.t.interval(0.9, len(xs) - 1, loc=sum(xs) / len(xs), scale=stats.sem(xs))
    assert (r["low"], r["high"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    one = t_interval([0.3, None])  # None (a missing run) is skipped; one value has no interval
    assert one["n"] == 1 and one["mean"] == 0.3 and one["sd"] is None and one["low"] is None
    assert t_interval([])["mean"] is None
    flat = t_interval([0.2, 0.2, 0.2])
    assert flat["sd"] == pytest.approx(0, abs=1e-15) and flat["low"] == pytest.approx(flat["high"], abs=1e-14)


def test_paired_difference_and_sentence_rule():
    more = {0: 0.10, 1: 0.12, 2: 0.08, 3: 0.5}
    multitask = {0: 0.11, 1: 0.15, 2: 0.10}
    d = paired_differences(more, multitask)  # seed 3 has no partner
    assert d == pytest.approx({0: -0.01, 1: -0.03, 2: -0.02})
    st = t_interval(d.values())
    half = T975[3] * 0.01 / math.sqrt(3)  # sd of (-0.01, -0.03, -0.02) is 0.01
    assert st["mean"] == pytest.approx(-0.02) and st["sd"] == pytest.approx(0.01)
    assert st["low"] == pytest.approx(-0.02 - half) and st["high"] == pytest.approx(-0.02 + half)
    assert st["high"] > 0  # the interval contains zero
    assert S.is_significant(st) is False
    s = S.difference_sentence("MORE", "MultiTask", "ECE10, all_average", st, direction("ece_10"))
    assert "no significant difference between MORE and MultiTask" in s and "3 paired seeds" in s

    st2 = t_interval(paired_differences({0: 0.10, 1: 0.12, 2: 0.08}, {0: 0.12, 1: 0.15, 2: 0.105}).values())
    assert st2["high"] < 0 and S.is_significant(st2) is True
    assert "MORE is better than MultiTask (lower;" in S.difference_sentence("MORE", "MultiTask", "ECE", st2, "lower")
    assert "MORE is worse than MultiTask (lower;" in S.difference_sentence("MORE", "MultiTask", "acc", st2, "higher")
    assert "MORE is lower than MultiTask" in S.difference_sentence("MORE", "MultiTask", "T", st2, None)
    few = t_interval([0.01])
    assert "too few seeds" in S.difference_sentence("MORE", "Uniform", "ECE", few, "lower")
    assert direction("ts_ece_10") == "lower" and direction("accuracy") == "higher"
    assert direction("temperature") == "closer to 1"


# ---------------------------------------------------------------------------------------------------
# Sweep definition


def test_seeds_grid_and_point_names():
    assert S.parse_seeds("0,1,2") == [0, 1, 2]
    assert S.parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    for bad in ("", "a", "3-1"):
        with pytest.raises(RecipeError, match="--seeds"):
            S.parse_seeds(bad)
    grid = S.parse_grid(["data.synthetic.drift_scale=0,0.5", "reward.methods=[more,multitask],[uniform]"])
    assert grid == [
        ("data.synthetic.drift_scale", ["0", "0.5"]),
        ("reward.methods", ["[more,multitask]", "[uniform]"]),
    ]
    names = [p["name"] for p in S.grid_points(grid)]
    assert names == [
        "drift_scale=0__methods=more+multitask",
        "drift_scale=0__methods=uniform",
        "drift_scale=0.5__methods=more+multitask",
        "drift_scale=0.5__methods=uniform",
    ]
    assert S.grid_points([]) == [{"name": "default", "values": {}}]
    # Same last segment on two axes: the full dotted keys name the points.
    both = S.grid_points(S.parse_grid(["data.seedless.x=1", "reward.x=2"]))
    assert both[0]["name"] == "data.seedless.x=1__reward.x=2"
    with pytest.raises(RecipeError, match="--seeds"):
        S.parse_grid(["data.synthetic.seed=1,2"])
    with pytest.raises(RecipeError, match="twice"):
        S.parse_grid(["a.b=1", "a.b=2"])
    with pytest.raises(RecipeError, match="form"):
        S.parse_grid(["novalue"])


def _all_seeds(recipe) -> dict:
    plain = recipe_to_dict(recipe)
    out = {}
    for path in S.seed_fields(plain):
        node = plain
        for k in path.split("."):
            node = node[int(k)] if isinstance(node, list) else node[k]
        out[path] = node
    return out


def test_seed_reaches_every_seed_field():
    r = load_recipe("tiny-cpu")
    assert set(S.seed_fields(recipe_to_dict(r))) == {"seed", "data.seed", "data.synthetic.seed"}
    extra = ["calibration.seed=11", "align.ppo={seed: 3}", "reward.train.data_seed=5"]
    r = load_recipe("tiny-cpu", extra)
    ov = S.seed_overrides(r, 7)
    assert {o.split("=")[0] for o in ov} == {
        "seed",
        "data.seed",
        "data.synthetic.seed",
        "calibration.seed",
        "align.ppo.seed",
        "reward.train.data_seed",
    }
    seeded = load_recipe("tiny-cpu", extra + ov)
    assert set(_all_seeds(seeded).values()) == {7}
    # A null calibration.seed follows the top-level seed already and is left alone.
    assert "calibration.seed" not in {o.split("=")[0] for o in S.seed_overrides(load_recipe("tiny-cpu"), 7)}


def test_dry_run_lists_every_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = S.main(
        [
            "--recipe",
            "tiny-cpu",
            "--seeds",
            "0,1",
            "--grid",
            "data.synthetic.drift_scale=0,2",
            "--stages",
            "reward,calibration",
            "--output-dir",
            str(out),
            "--dry-run",
            "reward.peft=none",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [ln for ln in lines if ln.startswith("todo")]
    assert len(runs) == 4 and "4 runs (2 point(s) x 2 seed(s))" in lines[-1]
    assert "drift_scale=2 seed-1" in runs[-1] and str(out / "drift_scale=2" / "seed-1") in runs[-1]
    assert any("data.synthetic.drift_scale=2 seed=1" in ln and "data.seed=1" in ln for ln in lines)
    assert not out.exists()
    assert S.main(["--recipe", "tiny-cpu", "--output-dir", str(out), "--grid", "reward.nope=1", "--dry-run"]) == 2
    assert S.main(["--seeds", "0"]) == 2  # no --output-dir


def test_overrides_may_come_before_and_after_options(tmp_path, capsys):
    """`... key=v --parallel 2 key2=v2` (as scripts/run_study.sh writes it) parses: argparse's plain
    parse_args rejected overrides that follow an option after other overrides."""
    out = tmp_path / "sweep"
    argv = ["--recipe", "tiny-cpu", "reward.peft=none", "--seeds", "0", "--parallel", "2"]
    rc = S.main([*argv, "data.synthetic.n_train=400", "--output-dir", str(out), "--dry-run"])
    assert rc == 0
    assert "reward.peft=none data.synthetic.n_train=400 seed=0" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Aggregation of fake run directories with known numbers


def _fake_metrics(ece: dict, acc: float) -> dict:
    """calibration/metrics.json of one RM as the calibration stage writes it (the fields used here)."""

    def block(e, t):
        return {
            "accuracy": acc,
            "ece_10": e,
            "brier": 0.2,
            "nll": 0.6,
            "temperature": t,
            "truth": {"prob_mae": 2 * e, "ece_vs_truth_10": e},
        }

    per = {s: {**block(e, 1.0), "temperature_scaled": block(e / 2, 0.8)} for s, e in ece.items()}
    avg = sum(ece.values()) / len(ece)
    per["all_average"] = {**block(avg, 1.0), "temperature_scaled": block(avg / 2, 0.8), "sources": list(ece)}
    return per


ECE = {  # (point, seed) -> {rm: all-source ECE}; two sources with ECE avg +- 0.01
    ("drift_scale=0", 0): {"more": 0.10, "multitask": 0.11, "uniform": 0.13},
    ("drift_scale=0", 1): {"more": 0.12, "multitask": 0.15, "uniform": 0.12},
    ("drift_scale=0", 2): {"more": 0.08, "multitask": 0.10, "uniform": 0.10},
    ("drift_scale=2", 0): {"more": 0.20, "multitask": 0.22, "uniform": 0.21},
    ("drift_scale=2", 1): {"more": 0.22, "multitask": 0.25, "uniform": 0.20},
}


def _fake_sweep(root: Path) -> None:
    points = S.grid_points(S.parse_grid(["data.synthetic.drift_scale=0,2"]))
    atomic_write_json(
        root / S.SWEEP_FILE,
        {
            "recipe": "tiny-cpu",
            "seeds": [0, 1, 2],
            "stages": "reward,calibration",
            "grid": [["data.synthetic.drift_scale", ["0", "2"]]],
            "overrides": [],
            "points": points,
            "runs": [],
        },
    )
    for (point, seed), per_rm in ECE.items():
        cal = root / point / f"seed-{seed}" / "calibration"
        metrics = {
            rm: _fake_metrics({"helpful": e - 0.01, "harmless": e + 0.01}, 0.6 + seed / 100)
            for rm, e in per_rm.items()
        }
        atomic_write_json(cal / "metrics.json", metrics)
        atomic_write_json(cal / "temperatures.json", dict.fromkeys(per_rm, 1.0 + seed))
        atomic_write_json(cal / "config.json", {"headline_bins": 10})


def test_aggregate_fake_runs_against_hand_values(tmp_path):
    _fake_sweep(tmp_path)
    summary = S.aggregate(tmp_path, verify=False)  # fake runs have no manifest
    p0 = summary["points"]["drift_scale=0"]
    assert p0["n_runs"] == 3 and p0["grid"] == {"data.synthetic.drift_scale": "0"}
    m = {(r["rm"], r["scope"], r["metric"]): r for r in p0["metrics"]}
    ece = m[("more", "all_average", "ece_10")]
    assert ece["mean"] == pytest.approx(0.10) and ece["sd"] == pytest.approx(0.02) and ece["n"] == 3
    half = T975[3] * 0.02 / math.sqrt(3)
    assert (ece["low"], ece["high"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert m[("more", "helpful", "ece_10")]["mean"] == pytest.approx(0.09)
    assert m[("more", "all_average", "ts_ece_10")]["mean"] == pytest.approx(0.05)
    assert m[("multitask", "all_average", "temperature")]["mean"] == pytest.approx(2.0)
    assert m[("uniform", "all_average", "truth_mae")]["mean"] == pytest.approx(2 * 0.35 / 3)
    assert ("more", "all_average", "ts_accuracy") not in m  # accuracy does not change with T

    d = {(x["a"], x["b"], x["scope"], x["metric"]): x for x in p0["differences"]}
    assert {(a, b) for a, b, _, _ in d} == {("more", "multitask"), ("more", "uniform"), ("uniform", "multitask")}
    mm = d[("more", "multitask", "all_average", "ece_10")]  # diffs -0.01, -0.03, -0.02 (hand computed above)
    assert mm["mean"] == pytest.approx(-0.02) and mm["n"] == 3 and mm["significant"] is False
    assert mm["high"] == pytest.approx(-0.02 + T975[3] * 0.01 / math.sqrt(3))
    assert "no significant difference between MORE and MultiTask" in mm["sentence"]
    um = d[("uniform", "multitask", "all_average", "ece_10")]  # diffs 0.02, -0.03, 0.0
    assert um["mean"] == pytest.approx(-0.01 / 3)

    p2 = summary["points"]["drift_scale=2"]
    assert p2["n_runs"] == 2 and p2["runs"]["2"] == "no results"
    d2 = {(x["a"], x["b"], x["scope"], x["metric"]): x for x in p2["differences"]}
    mm2 = d2[("more", "multitask", "all_average", "ece_10")]  # diffs -0.02, -0.03: mean -0.025, sd 0.00707
    assert mm2["mean"] == pytest.approx(-0.025) and mm2["sd"] == pytest.approx(math.sqrt(0.00005))
    assert mm2["high"] == pytest.approx(-0.025 + T975[2] * math.sqrt(0.00005) / math.sqrt(2))

    md = (tmp_path / "summary.md").read_text()
    assert "## drift_scale=0" in md and "Seeds with results: 2 of 3 (missing: 2: no results)" in md
    assert "| MORE | 0." in md and "0.1000 [" in md
    assert "ECE10, all_average: no significant difference between MORE and MultiTask" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| drift_scale=0 |"))  # the first overview table
    assert "-0.0200 [" in row and "no significant difference" in row
    assert (tmp_path / "plot_drift_scale.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["confidence"] == 0.95

    # --aggregate on the command line verifies each run against the sweep's definition: these fake runs
    # are not in it (and have no manifest), so none is counted. No sweep.json: one clean error.
    (tmp_path / "summary.json").unlink()
    assert S.main(["--aggregate", str(tmp_path)]) == 0
    unverified = json.loads((tmp_path / "summary.json").read_text())["points"]["drift_scale=0"]
    assert unverified["n_runs"] == 0 and unverified["runs"]["0"] == "not in the sweep definition"
    assert S.main(["--aggregate", str(tmp_path / "nothing")]) == 2


def test_align_results_are_aggregated_per_method():
    metrics = {
        "policies": {
            "base": {"gold": {"all": {"mean": -2.0}}, "perplexity": {"helpful": 20.0}},
            "more/rjs": {"gold": {"all": {"mean": -1.0}, "helpful": {"mean": -1.5}}},
            "multitask/rjs": {"gold": {"all": {"mean": -1.5}}},
        }
    }
    judgements = {"rjs: more vs multitask": {"all": {"win": 0.5, "tie": 0.2, "lose": 0.3, "n": 10}}}
    rows = S.align_values(metrics, judgements)
    assert ("align", "more/rjs", "helpful", "gold_reward", -1.5) in rows
    assert ("align", "base", "helpful", "perplexity", 20.0) in rows
    assert ("judge", "rjs: more vs multitask", "all", "win_minus_lose", pytest.approx(0.2)) in rows
    shifted = [(s, n, sc, m, v + 0.1 if n == "more/rjs" else v) for s, n, sc, m, v in rows]
    agg = S.aggregate_point({0: rows, 1: shifted})
    d = [x for x in agg["differences"] if x["section"] == "align"]
    assert [(x["a"], x["b"], x["scope"]) for x in d] == [("more/rjs", "multitask/rjs", "all")]
    assert d[0]["mean"] == pytest.approx(0.55) and d[0]["better"] == "higher"


# ---------------------------------------------------------------------------------------------------
# A real 2-seed sweep of the tiny recipe: interrupted, resumed (in parallel), re-aggregated

TINY = [
    "data.synthetic.n_train=40",
    "data.synthetic.n_valid=16",
    "data.synthetic.n_test=24",
    "data.sources=[{name: helpful}, {name: harmless}]",
    "calibration.bootstrap_samples=0",
    "calibration.n_bins=[10]",
    "reward.methods=[more,multitask,uniform]",
    "reward.train.save_steps=5",
]


@pytest.mark.slow
def test_two_seed_sweep_interrupted_then_resumed(tmp_path, monkeypatch, one_thread):
    import pipeline.stages as stages

    out = tmp_path / "sweep"
    args = [
        "--recipe",
        "tiny-cpu",
        "--seeds",
        "0,1",
        "--stages",
        "reward,calibration",
        "--output-dir",
        str(out),
        *TINY,
    ]
    real_run = stages.get("calibration").run

    def interrupted(recipe, run_dir, *, force=False):  # Ctrl-C while seed 1 is in its calibration stage
        if recipe.seed == 1:
            raise KeyboardInterrupt("test interrupt")
        return real_run(recipe, run_dir, force=force)

    set_stage_run(monkeypatch, "calibration", interrupted)
    assert S.main(args) == 130
    s0, s1 = out / "default" / "seed-0", out / "default" / "seed-1"
    m0 = json.loads((s0 / "manifest.json").read_text())
    m1 = json.loads((s1 / "manifest.json").read_text())
    assert m0["stages"]["calibration"]["status"] == "done"
    assert m1["stages"]["reward"]["status"] == "done" and m1["stages"]["calibration"]["status"] == "interrupted"
    for m, seed in ((m0, 0), (m1, 1)):  # the seed reached every seed field of each run
        r = m["recipe"]
        assert (r["seed"], r["data"]["seed"], r["data"]["synthetic"]["seed"]) == (seed, seed, seed)
    set_stage_run(monkeypatch, "calibration", real_run)

    # The same command resumes: seed 0 is skipped, seed 1 keeps its reward models and reruns calibration
    # (here as a subprocess of --parallel 2, the other run path).
    before0 = {s: e.get("run_id") for s, e in m0["stages"].items()}
    reward1 = m1["stages"]["reward"]["run_id"]
    assert S.main(args + ["--parallel", "2"]) == 0
    m0 = json.loads((s0 / "manifest.json").read_text())
    m1 = json.loads((s1 / "manifest.json").read_text())
    assert {s: e.get("run_id") for s, e in m0["stages"].items()} == before0
    assert m1["stages"]["reward"]["run_id"] == reward1 and m1["stages"]["calibration"]["status"] == "done"
    assert "calibration" in (s1 / "sweep.log").read_text() and not (s0 / "sweep.log").exists()

    summary = json.loads((out / "summary.json").read_text())
    p = summary["points"]["default"]
    assert p["n_runs"] == 2
    ece = {(r["rm"], r["scope"]): r for r in p["metrics"] if r["metric"] == "ece_10"}
    scopes = ("helpful", "harmless", "all_average")
    assert set(ece) >= {(rm, s) for rm in ("more", "multitask", "uniform") for s in scopes}
    e = ece[("more", "all_average")]
    assert e["n"] == 2 and e["values"]["0"] != e["values"]["1"]  # two different replicates
    assert e["low"] <= e["mean"] <= e["high"]
    diffs = {(d["a"], d["b"]) for d in p["differences"] if d["metric"] == "ece_10" and d["scope"] == "all_average"}
    assert diffs == {("more", "multitask"), ("more", "uniform"), ("uniform", "multitask")}
    assert "Seed-paired differences" in (out / "summary.md").read_text()

    # Everything is done now: a dry run says so; --aggregate alone rebuilds the summary.
    assert S.main(args + ["--dry-run"]) == 0
    (out / "summary.md").unlink()
    assert S.main(["--aggregate", str(out)]) == 0 and (out / "summary.md").exists()

    # A run whose settings changed since it finished is not aggregated (its results are stale).
    sweep = json.loads((out / "sweep.json").read_text())
    sweep["runs"][1]["overrides"].append("data.synthetic.drift_scale=2")
    atomic_write_json(out / "sweep.json", sweep)
    stale = S.aggregate(out)["points"]["default"]
    assert stale["n_runs"] == 1 and stale["runs"]["1"].startswith("not done (reward: config changed")


# ---------------------------------------------------------------------------------------------------
# Under torchrun every run uses both processes (fake stages, so only the orchestration is measured)

SWEEP_RUNNER = """
import sys

import fakepipe
import pipeline.stages as stages
import pipeline.sweep as S

fakepipe.install(stages)
sys.exit(S.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_under_torchrun_runs_each_run_on_both_processes(tmp_path):
    fakes = write_fakes(tmp_path / "fakes")  # a local folder, not the fixture
    (fakes / "sweep_runner.py").write_text(SWEEP_RUNNER)
    env = fakes_env(fakes, tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "sweep"
    args = [
        str(fakes / "sweep_runner.py"),
        "--recipe",
        str(fakes / "fake.yaml"),
        "--seeds",
        "0,1",
        "--grid",
        "data.n=1,2",
        "--stages",
        "reward,calibration",
        "--output-dir",
        str(out),
    ]

    p = torchrun_fakes(args, env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (tmp_path / "calls.log").read_text().split("\n")
    for stage in ("reward", "calibration"):
        for rank in ("0", "1"):
            assert lines.count(f"{stage} end {rank}") == 4, (stage, rank)  # 2 points x 2 seeds, on each rank
    for point in ("n=1", "n=2"):
        for seed in (0, 1):
            m = json.loads((out / point / f"seed-{seed}" / "manifest.json").read_text())
            assert m["recipe"]["seed"] == seed and m["recipe"]["data"]["n"] == int(point[-1])
            assert m["stages"]["calibration"]["status"] == "done" and m["stages"]["calibration"]["world_size"] == 2
    summary = json.loads((out / "summary.json").read_text())  # written once, by the main process
    assert summary["points"]["n=2"]["runs"] == {"0": "no results", "1": "no results"}  # fakes write no metrics
    assert p.stderr.count("wrote ") == 1

    (tmp_path / "calls.log").unlink()
    p = torchrun_fakes(args, env, timeout=300)  # everything is done: both ranks skip every run
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "calls.log").exists() and p.stderr.count("done, skipped") == 4


# ---------------------------------------------------------------------------------------------------
# Bounded intervals, few seeds, units, the closing paragraph, the seeds-only plot


def _two_seed_rows():
    """2 seeds: accuracy 0.99 / 0.90, ECE 0.01 / 0.05, T 0.2 / 3.0 for MORE; their t-intervals (t = 12.7)
    reach above 1, below 0 and below 0."""
    out = {}
    for seed, (acc, ece, t) in enumerate([(0.99, 0.01, 0.2), (0.90, 0.05, 3.0)]):
        out[seed] = [
            ("calibration", "more", "all_average", "accuracy", acc),
            ("calibration", "more", "all_average", "ece_10", ece),
            ("calibration", "more", "all_average", "temperature", t),
            ("calibration", "multitask", "all_average", "accuracy", acc - 0.1),
            ("calibration", "multitask", "all_average", "ece_10", ece + 0.05),
            ("calibration", "multitask", "all_average", "temperature", t),
        ]
    return out


def test_bounded_metrics_are_clipped_to_their_range_and_few_seeds_warned():
    agg = S.aggregate_point(_two_seed_rows())
    m = {(r["rm"], r["metric"]): r for r in agg["metrics"]}
    acc, ece, t = m[("more", "accuracy")], m[("more", "ece_10")], m[("more", "temperature")]
    half = T975[2] * math.sqrt((0.09**2) / 2) / math.sqrt(2)  # sd of (0.99, 0.90) = 0.09 / sqrt 2
    assert acc["t_high"] == pytest.approx(0.945 + half) and acc["high"] == 1.0 and acc["clipped"] == ["high"]
    assert acc["low"] == pytest.approx(0.945 - half) and "t_low" not in acc
    assert ece["t_low"] < 0 and ece["low"] == 0.0 and ece["clipped"] == ["low"]
    assert t["low"] == 0.0 and t["t_low"] < 0
    assert S.metric_range("ts_ece_15") == (0.0, 1.0) and S.metric_range("gold_reward") == (None, None)
    # differences are not clipped (they are compared with 0)
    d = next(x for x in agg["differences"] if x["metric"] == "accuracy")
    assert "clipped" not in d and d["mean"] == pytest.approx(0.1)
    # cells: accuracy in %, the clipped end marked, the seed count shown below 3 seeds
    assert S.cell(acc, "accuracy") == f"94.50 [{100 * (0.945 - half):.2f}, 100.00] † (n=2)"
    assert S.cell(ece, "ece_10").startswith("0.0300 [0.0000, ") and "†" in S.cell(ece, "ece_10")
    assert "t = 12.7" in S.seed_warning(2) and S.seed_warning(3) == "" and S.seed_warning(1) == ""
    summary = {
        "sweep": {"recipe": "tiny-cpu", "seeds": [0, 1], "grid": []},
        "confidence": 0.95,
        "points": {"default": {"grid": {}, "runs": {"0": "collected", "1": "collected"}, "n_runs": 2, **agg}},
    }
    md = S.render_summary(summary)
    assert "**Warning: 2 seeds." in md and "| *better* | higher is better | lower is better" in md
    assert "| MORE | 94.50 [" in md  # accuracy (%) in the table, as report.md


def test_summary_paragraph_names_every_significant_difference():
    """3 seeds: Brier MORE - MultiTask +0.018 +- 0.001 (significant, not a column of the difference table),
    ECE -0.02 / -0.021 / -0.019 (significant), accuracy +0.01 / -0.01 / 0 (not); T both above 1, MORE closer."""
    per_seed = {}
    for seed, (d_ece, d_acc, d_brier) in enumerate(
        [(-0.020, 0.01, 0.017), (-0.021, -0.01, 0.018), (-0.019, 0, 0.019)]
    ):
        per_seed[seed] = [
            ("calibration", "multitask", "helpful", "brier", 0.2),
            ("calibration", "more", "helpful", "brier", 0.2 + d_brier),
            ("calibration", "multitask", "all_average", "ece_10", 0.1 + seed / 100),
            ("calibration", "more", "all_average", "ece_10", 0.1 + seed / 100 + d_ece),
            ("calibration", "multitask", "all_average", "accuracy", 0.7),
            ("calibration", "more", "all_average", "accuracy", 0.7 + d_acc),
            ("calibration", "multitask", "all_average", "temperature", 1.5 + seed / 100),
            ("calibration", "more", "all_average", "temperature", 1.2 + seed / 100),
        ]
    agg = S.aggregate_point(per_seed)
    d = {(x["scope"], x["metric"]): x for x in agg["differences"]}
    assert d[("helpful", "brier")]["p_value"] == pytest.approx(
        __import__("scipy.stats").stats.ttest_1samp([0.017, 0.018, 0.019], 0.0).pvalue
    )
    assert d[("all_average", "temperature")]["sentence"].startswith(
        "temperature T, all_average: MORE is better than MultiTask (lower, closer to 1 is better;"
    )
    summary = {
        "sweep": {"recipe": "tiny-cpu", "seeds": [0, 1, 2], "grid": []},
        "confidence": 0.95,
        "points": {"default": {"grid": {}, "runs": {}, "n_runs": 3, **agg}},
    }
    para = S.summary_paragraph(summary)
    assert para.startswith("Summary: 3 of the 4 seed-paired differences tested are significant")
    assert "MORE - MultiTask, Brier, helpful +0.018 [" in para and "MultiTask better" in para
    assert "MORE - MultiTask, ECE10, all_average -0.02 [" in para and "MORE better" in para
    assert "temperature T, all_average -0.3 [" in para and "(closer to 1)" in para
    assert "accuracy" not in para
    md = S.render_summary(summary)
    assert md.rstrip().endswith(para) and "| p | n | verdict |" in md


def test_help_prints_a_single_percent_sign():
    text = S.build_parser().format_help()
    assert "95%" in text and "%%" not in text


def test_help_and_readme_say_where_the_summary_goes_with_export():
    """Issue 28, item 10: the help said D/summary.md, but with --export the summary is written only to E."""
    import re

    from tests.helpers import REPO

    text = " ".join(S.build_parser().format_help().split())
    assert "with --export E, into E/summary.{json,md} instead" in text and "D then gets no summary" in text
    assert "E/summary.{json,md} (not to D)" in text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert re.search(r"With `--export E` the sweep's summary .* is written into E only", readme)


def test_seeds_only_sweep_writes_a_plot(tmp_path):
    agg = S.aggregate_point(_two_seed_rows())
    summary = {
        "sweep": {"recipe": "tiny-cpu", "seeds": [0, 1], "grid": []},
        "confidence": 0.95,
        "points": {"default": {"grid": {}, "runs": {}, "n_runs": 2, **agg}},
    }
    assert S.write_plots(tmp_path, summary) == ["plot_seeds.png"]
    assert (tmp_path / "plot_seeds.png").stat().st_size > 5000


# ---------------------------------------------------------------------------------------------------
# --export: a results folder that outlives the machine (fake stages: only the bookkeeping is measured)

FAKE_CALIBRATION = """
import json
from pathlib import Path

from fakepipe import make_run
from pipeline.io import atomic_write_json

_run = make_run("calibration")


def run(recipe, run_dir, *, force=False):
    out = _run(recipe, run_dir)
    cal, rm = Path(run_dir) / "calibration", Path(run_dir) / "reward" / "more"
    s = recipe.seed
    metrics = {
        name: {"all_average": {"accuracy": 0.6 + s / 100 + k / 50, "ece_10": 0.1 - s / 100 - k / 100}}
        for k, name in enumerate(("more", "multitask"))
    }
    atomic_write_json(cal / "metrics.json", metrics)
    atomic_write_json(cal / "temperatures.json", {"more": 1.2, "multitask": 1.5})
    atomic_write_json(cal / "config.json", {"headline_bins": 10, "rm_path": str(rm.resolve())})
    atomic_write_json(rm / "train_log.json", [{"step": 1, "more/lambda/a": 0.4, "more/lambda/b": 0.6}])
    (rm / "model.safetensors").write_bytes(b"weights")
    return out + ["calibration/metrics.json", "calibration/temperatures.json", "calibration/config.json"]
"""


def test_export_then_aggregate_from_the_folder_alone_and_resume_on_a_new_machine(fakes, tmp_path, capsys, monkeypatch):  # noqa: F811
    import importlib.util
    import shutil

    (fakes / "fake_calibration.py").write_text(FAKE_CALIBRATION)
    spec = importlib.util.spec_from_file_location("fake_calibration", fakes / "fake_calibration.py")
    fake_calibration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_calibration)
    set_stage_run(monkeypatch, "calibration", fake_calibration.run)
    export = tmp_path / "results"
    base = ["--recipe", str(fakes / "fake.yaml"), "--stages", "reward,calibration", "--export", str(export)]
    d1 = tmp_path / "machine1"
    assert S.main(base + ["--seeds", "0,1", "--output-dir", str(d1)]) == 0
    assert calls(tmp_path)["calibration"] == 2
    for seed in (0, 1):
        e = export / "default" / f"seed-{seed}"
        files = json.loads((e / "export.json").read_text())["files"]
        assert {"manifest.json", "recipe.yaml", "calibration/metrics.json", "reward/more/train_log.json"} <= set(files)
        assert not (e / "reward" / "more" / "model.safetensors").exists()  # no weights
        assert not (e / "reward" / "checkpoint.json").exists()  # no checkpoints
        assert json.loads((e / "calibration" / "config.json").read_text())["rm_path"] == "reward/more"
    for f in export.rglob("*"):  # no absolute path of this machine in any exported file
        if f.is_file() and f.suffix in (".json", ".yaml", ".md"):
            assert str(tmp_path) not in f.read_text(), f
    assert json.loads((export / "sweep.json").read_text())["recipe"] == "fake.yaml"
    assert (export / "summary.md").exists()

    # The machine is gone: the folder alone aggregates (no run directories).
    shutil.rmtree(d1)
    (export / "summary.json").unlink()
    assert S.main(["--aggregate", str(export)]) == 0
    p = json.loads((export / "summary.json").read_text())["points"]["default"]
    assert p["n_runs"] == 2 and set(p["runs"].values()) == {"collected"}
    acc = next(r for r in p["metrics"] if r["rm"] == "more" and r["metric"] == "accuracy")
    assert acc["values"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.61)}

    # A new machine with one more seed: the exported runs are skipped, only seed 2 runs.
    d2 = tmp_path / "machine2"
    assert S.main(base + ["--seeds", "0-2", "--output-dir", str(d2)]) == 0
    assert calls(tmp_path)["calibration"] == 3 and not (d2 / "default" / "seed-0").exists()
    assert json.loads((export / "summary.json").read_text())["points"]["default"]["n_runs"] == 3
    capsys.readouterr()
    assert S.main(base + ["--seeds", "0-2", "--output-dir", str(tmp_path / "machine3"), "--dry-run"]) == 0
    listing = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("done")]
    assert len(listing) == 3 and all("exported to" in ln for ln in listing)

    # Changed settings: the exports no longer match, so every run runs again (and is re-exported).
    assert S.main(base + ["--seeds", "0", "--output-dir", str(d2), "reward.steps=3"]) == 0
    assert calls(tmp_path)["calibration"] == 4
    assert "reward.steps=3" in json.loads((export / "default" / "seed-0" / "export.json").read_text())["overrides"]

    # An export of another definition is not aggregated: it names why.
    sweep = json.loads((export / "sweep.json").read_text())
    sweep["runs"][0]["overrides"].append("data.n=5")
    atomic_write_json(export / "sweep.json", sweep)
    stale = S.aggregate(export)["points"]["default"]
    assert stale["n_runs"] == 0 and stale["runs"]["0"] == (
        "not exported (its overrides differ from the sweep's definition)"
    )


def test_resummarize_recomputes_a_committed_summary_from_its_own_values(tmp_path):
    """--aggregate D --from-summary: the statistics rebuilt from summary.json's per-seed values equal those
    `aggregate` computed from the run directories (here after the run directories are gone)."""
    import shutil

    _fake_sweep(tmp_path)
    first = S.aggregate(tmp_path, verify=False)
    for point in ("drift_scale=0", "drift_scale=2"):
        shutil.rmtree(tmp_path / point)
    (tmp_path / "summary.md").unlink()
    assert S.main(["--aggregate", str(tmp_path), "--from-summary"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again == json.loads(json.dumps(first))
    assert (tmp_path / "summary.md").exists() and (tmp_path / "plot_drift_scale.png").exists()


def _fake_calibration_module(fakes):
    import importlib.util

    (fakes / "fake_calibration.py").write_text(FAKE_CALIBRATION)
    spec = importlib.util.spec_from_file_location("fake_calibration", fakes / "fake_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exports_made_with_other_settings_are_left_out_and_named(fakes, tmp_path, monkeypatch):  # noqa: F811
    """--aggregate E compares each export's run fingerprint with the one E/sweep.json records: an export made
    from an edited recipe FILE (same name, stages and overrides; other settings in its recipe.yaml) is left out
    of the means, and summary.md names the run and the setting that differs. A definition written before the
    fingerprints were recorded is checked by the runs' recipe.yaml (seeds aside)."""
    fake_calibration = _fake_calibration_module(fakes)
    set_stage_run(monkeypatch, "calibration", fake_calibration.run)
    export = tmp_path / "results"
    recipe = fakes / "fake.yaml"
    base = ["--recipe", str(recipe), "--stages", "reward,calibration", "--export", str(export), "--seeds", "0,1"]
    assert S.main(base + ["--output-dir", str(tmp_path / "m1")]) == 0
    fingerprints = [r["fingerprint"] for r in json.loads((export / "sweep.json").read_text())["runs"]]
    assert len(set(fingerprints)) == 2 and all(len(f) == 64 for f in fingerprints)

    # The recipe file is edited; on the rerun seed 1 fails, so E keeps its export of the old settings.
    recipe.write_text(recipe.read_text().replace("n: 4", "n: 5"))

    def seed_one_fails(r, run_dir, *, force=False):
        if r.seed == 1:
            raise RuntimeError("seed 1 broke")
        return fake_calibration.run(r, run_dir, force=force)

    set_stage_run(monkeypatch, "calibration", seed_one_fails)
    assert S.main(base + ["--output-dir", str(tmp_path / "m2")]) == 1
    old = json.loads((export / "default" / "seed-1" / "export.json").read_text())
    assert old["overrides"] == json.loads((export / "sweep.json").read_text())["runs"][1]["overrides"]
    p = json.loads((export / "summary.json").read_text())["points"]["default"]
    assert p["n_runs"] == 1 and p["runs"]["0"] == "collected"
    assert p["runs"]["1"].startswith("left out: made with other settings than the sweep's definition")
    assert "data.n: 5 -> 4" in p["runs"]["1"]
    acc = next(r for r in p["metrics"] if r["rm"] == "more" and r["metric"] == "accuracy")
    assert list(acc["values"]) == ["0"]
    md = (export / "summary.md").read_text()
    assert "Seeds with results: 1 of 2." in md
    assert "**Runs left out, not averaged with the others: seed 1: made with other settings" in md
    assert "data.n: 5 -> 4" in md

    # A definition without fingerprints (written by an older version): the runs' recipe.yaml disagree.
    sweep = json.loads((export / "sweep.json").read_text())
    for run in sweep["runs"]:
        run.pop("fingerprint")
    atomic_write_json(export / "sweep.json", sweep)
    legacy = S.aggregate(export)["points"]["default"]
    assert legacy["n_runs"] == 1 and "made with other settings than the point's other runs" in legacy["runs"]["1"]
    assert "differs from seed 0's: data.n: 5 -> 4" in legacy["runs"]["1"]


def test_invalid_per_seed_values_are_named_and_seeds_counted_truthfully(tmp_path):
    """NaN, inf, a string and an ECE of 1e300 in one run's metrics.json: the summary is still written (1e300
    crashed it with an OverflowError), each value left out is named (run, metric, value, why) in summary.md
    and summary.json, and each mean says how many seeds it used."""
    _fake_sweep(tmp_path)
    path = tmp_path / "drift_scale=2" / "seed-1" / "calibration" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["more"]["all_average"]["ece_10"] = float("nan")
    metrics["more"]["all_average"]["accuracy"] = "x"
    metrics["multitask"]["all_average"]["ece_10"] = 1e300
    metrics["uniform"]["all_average"]["brier"] = float("inf")
    path.write_text(json.dumps(metrics))
    summary = S.aggregate(tmp_path, verify=False)
    p2 = summary["points"]["drift_scale=2"]
    bad = {(b["rm"], b["metric"]): (b["value"], b["why"]) for b in p2["invalid"]}
    assert bad[("more", "ece_10")] == ("nan", "not finite")
    assert bad[("more", "accuracy")] == ("'x'", "not a number")
    assert (
        bad[("multitask", "ece_10")][0] == "1e+300" and "outside the range of ECE10" in bad[("multitask", "ece_10")][1]
    )
    assert bad[("uniform", "brier")] == ("inf", "not finite")
    m = {(r["rm"], r["scope"], r["metric"]): r for r in p2["metrics"]}
    assert m[("more", "all_average", "ece_10")]["n"] == 1 and m[("more", "all_average", "ece_10")]["left_out"] == ["1"]
    assert m[("more", "all_average", "ece_10")]["mean"] == pytest.approx(0.20)
    d = {(x["a"], x["b"], x["scope"], x["metric"]): x for x in p2["differences"]}
    assert d[("more", "multitask", "all_average", "ece_10")]["n"] == 1  # seed 1 has no valid pair
    md = (tmp_path / "summary.md").read_text()
    assert "Seeds with results: 2 of 3" in md
    assert "**Values left out of the means (4;" in md
    assert "seed 1: MORE, all_average, ECE10 = nan (not finite)" in md
    assert "seed 1: MultiTask, all_average, ECE10 = 1e+300 (outside the range of ECE10 [0, 1])" in md
    assert "seed 1: MORE, all_average, accuracy = 'x' (not a number)" in md
    row = next(ln for ln in md.split("## drift_scale=2", 1)[1].splitlines() if ln.startswith("| MORE |"))
    assert "(n=1; seed 1 left out)" in row
    # a seed whose every value is invalid does not count as a seed with results
    for rm in metrics:
        for scope in metrics[rm]:
            if isinstance(metrics[rm][scope], dict):
                metrics[rm][scope] = dict.fromkeys(metrics[rm][scope], "broken")
    path.write_text(json.dumps(metrics))
    (tmp_path / "drift_scale=2" / "seed-1" / "calibration" / "temperatures.json").write_text("{}")
    p2 = S.aggregate(tmp_path, verify=False)["points"]["drift_scale=2"]
    assert p2["n_runs"] == 1 and p2["runs"]["1"].startswith("no valid results")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": ["x"]}, "'seeds' must be a non-empty list of seeds"),
        ({"points": None}, "'points' (the grid points) is missing"),
        ({"points": [{"name": "../x", "values": {}}]}, "point name '../x' is not one plain directory name"),
        ({"runs": [{"point": "default", "seed": "../../x", "overrides": []}]}, "a run must be"),
    ],
)
def test_a_corrupt_or_escaping_sweep_json_is_one_error(tmp_path, capsys, change, message):
    """sweep.json with seeds that are not integers, no points, or a point name like ../x (which made
    --aggregate read outside its folder): one line naming the file, no traceback, nothing written."""
    _fake_sweep(tmp_path)
    sweep = json.loads((tmp_path / S.SWEEP_FILE).read_text())
    sweep.update(change)
    if sweep["points"] is None:
        del sweep["points"]
    atomic_write_json(tmp_path / S.SWEEP_FILE, sweep)
    assert S.main(["--aggregate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{S.SWEEP_FILE}: " in err and message in err and "rerun the sweep" in err
    assert not (tmp_path / "summary.json").exists()


def test_a_credential_in_a_url_override_is_masked_in_the_exported_results(fakes, tmp_path, monkeypatch, capsys):  # noqa: F811
    """An override holding a URL with `user:pw@` and `?key=` (a judge base_url): the results folder E (sweep.json,
    each export.json, recipe.yaml and manifest.json), summary.md/json and --dry-run show it masked; the runs get
    it as written, and a rerun still finds them exported."""
    fake_calibration = _fake_calibration_module(fakes)
    set_stage_run(monkeypatch, "calibration", fake_calibration.run)
    secrets = ("PASSWORD-0123456789", "QUERYKEY-0123456789")
    url = f"https://u:{secrets[0]}@judge.example/v1?api-version=1&key={secrets[1]}"
    export, d = tmp_path / "results", tmp_path / "d"
    args = ["--recipe", str(fakes / "fake.yaml"), "--stages", "reward,calibration", "--export", str(export)]
    args += ["--seeds", "0,1", "--output-dir", str(d), f"data.extra={{url: '{url}'}}"]
    assert S.main(args) == 0
    assert S.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("(exported to") == 2  # masked overrides still match their exports
    texts = {str(f): f.read_text() for f in export.rglob("*") if f.is_file() and f.suffix in (".json", ".yaml", ".md")}
    texts["dry-run"] = out
    for where, text in texts.items():
        assert not any(s in text for s in secrets), where
    assert (
        "https://***@judge.example/v1?api-version=1&key=***"
        in (export / "default" / "seed-0" / "recipe.yaml").read_text()
    )
    assert json.loads((export / "summary.json").read_text())["points"]["default"]["n_runs"] == 2
    assert S.main(["--aggregate", str(export)]) == 0
    assert json.loads((export / "summary.json").read_text())["points"]["default"]["n_runs"] == 2


def test_t_test_is_the_t_interval_with_the_one_sample_t_tests_p():
    from scipy.stats import ttest_1samp

    from pipeline.stats import t_interval, t_test

    values = [0.12, 0.08, -0.03, 0.11, 0.09]
    out = t_test(values)
    assert {k: v for k, v in out.items() if k != "p_value"} == t_interval(values)
    assert out["p_value"] == pytest.approx(ttest_1samp(values, 0).pvalue, rel=1e-12)
    assert t_test([0.5])["p_value"] is None  # one value: no sd, no test
