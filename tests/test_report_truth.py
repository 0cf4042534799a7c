"""What report.md says about a run is true: the sources of "What ran" (no metrics.json key taken for a source,
group_by sources with their parent's format, path and column), the significance rule stated whole where it is
used, the configuration it shows (only the sections the run used)."""

from __future__ import annotations

import json

import pipeline.config as C
import pipeline.report.stage as report
from tests.helpers import fake_calibration_dir


def _manifest(d, data, **stages):
    stage = {"status": "done", "inputs": {"seed": 0, "data": data}}
    all_stages = {"calibration": stage, **stages, "report": {"status": "running"}}
    (d / "manifest.json").write_text(json.dumps({"stages": all_stages}))


def _rm_eval_run(tmp_path, metrics: dict, sources: list[dict], config: dict | None = None):
    """A run directory of an rm-eval-like run (calibration and report only) with these metrics and sources."""
    recipe = C.load_recipe("rm-eval", [f"data_root={tmp_path}", "report.paper_model=all"])
    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    (d / "calibration" / "metrics.json").write_text(json.dumps(metrics))
    cfg = {"external": {"mine": "/models/mine"}, **(config or {})}
    (d / "calibration" / "config.json").write_text(json.dumps(cfg))
    data = C.to_plain(recipe.data)
    data["sources"] = sources
    _manifest(d, data)
    return recipe, d


def test_what_ran_lists_sources_not_metrics_keys_and_group_sources_with_their_parent(tmp_path):
    """metrics.json's `train_overlap` (written for every RM) is no source; sources made by group_by (named by
    group_names too) show the parent's format, path and group_by column."""
    per_source = {"n_pairs": 78, "accuracy": 0.6}
    metrics = {
        "mine": {
            "helpful": per_source,
            "harmless": per_source,
            "tldr": per_source,
            "all_average": {"accuracy": 0.6},
            "hh_average": {"accuracy": 0.6},
            "train_overlap": {"checked": False, "test": {}, "validation": {}},
        }
    }
    sources = [
        {
            "name": "hh",
            "format": "hh-rlhf",
            "path": "/data/hh-rlhf",
            "options": {"group_by": "subset", "group_names": {"helpful-base": "helpful", "harmless-base": "harmless"}},
        },
        {"name": "tldr", "format": "summarize", "path": "/data/tldr", "options": {}},
    ]
    recipe, d = _rm_eval_run(tmp_path, metrics, sources)
    md = report.render_report(recipe, d)[0]
    assert "| train_overlap |" not in md
    assert "| helpful | hh-rlhf | `/data/hh-rlhf` | subset | - | - | 78 |" in md
    assert "| harmless | hh-rlhf | `/data/hh-rlhf` | subset | - | - | 78 |" in md
    assert "| tldr | summarize | `/data/tldr` | - | - | - | 78 |" in md
    assert "| ? |" not in md


def test_what_ran_takes_a_source_it_cannot_place_from_what_the_data_layer_loaded(tmp_path):
    """A source the data section does not name (e.g. a group name the recipe no longer maps) gets the format and
    path its load recorded (calibration/config.json data_stats)."""
    metrics = {"mine": {"odd": {"n_pairs": 5}, "all_average": {}, "train_overlap": {}}}
    stats = {"odd": {"pairs": {"test": 5}, "loaded": [{"format": "trl", "path": "/data/x.jsonl", "records": 9}]}}
    recipe, d = _rm_eval_run(
        tmp_path, metrics, [{"name": "other", "format": "trl", "path": "/y"}], {"data_stats": stats}
    )
    md = report.render_report(recipe, d)[0]
    assert "| odd | trl | `/data/x.jsonl` | - | - | - | 5 |" in md


# --------------------------------------------------------------------------------------------------
# The significance rule, whole, where it is used (issue 28, item 6)


def test_a_sentence_whose_interval_and_p_disagree_says_which_condition_failed():
    """The issue's case: -4.37 points, 95% CI -8.46 to -0.28, p = 0.050 from 200 resamples read as a
    contradiction. Now the sentence says the interval excludes 0 but p is not below 0.05, and how coarse p is."""
    from pipeline.calibration.compare import difference_sentence

    entry = {"a": 0.55, "b": 0.5937, "diff": -0.0437, "ci95": [-0.0846, -0.0028], "p_value": 0.05}
    kw = dict(lower_is_better=False, scale=100, digits=2, unit=" points")
    s = difference_sentence("MORE", "MultiTask", "Accuracy, all sources", entry, n_samples=200, **kw)
    assert s == (
        "Accuracy, all sources: no significant difference between MORE and MultiTask (difference -4.37 points, "
        "95% CI -8.46 to -0.28; p = 0.050 (in steps of 0.010: 200 resamples)): the interval excludes 0 but p is not "
        "below 0.05, and the rule needs both."
    )
    # the other disagreement, and none: both conditions fail, nothing more to say
    entry.update(ci95=[-0.0846, 0.0], p_value=0.04)
    s = difference_sentence("MORE", "MultiTask", "Accuracy", entry, n_samples=200, **kw)
    assert s.endswith(": p is below 0.05 but the interval does not exclude 0, and the rule needs both.")
    entry.update(ci95=[-0.0846, 0.01], p_value=0.3)
    assert difference_sentence("MORE", "MultiTask", "Accuracy", entry, n_samples=200, **kw).endswith("resamples)).")
    # with 1000 resamples (the stage's default) p is fine enough: no resolution note
    entry.update(p_value=0.3)
    assert "in steps of" not in difference_sentence("a", "b", "x", entry, n_samples=1000, **kw)


def test_p_of_zero_from_few_resamples_is_not_written_below_their_resolution():
    """No resample crossing 0 out of 200 says p < 2/200 = 0.010, not p < 0.001."""
    from pipeline.calibration.compare import p_text, render_comparisons, win_lose_sentence

    assert p_text(0.0, 200) == "p < 0.010" and p_text(0.0, 5000) == "p < 0.001" and p_text(0.0) == "p < 0.001"
    assert p_text(0.03, 200, resolution=True) == "p = 0.030 (in steps of 0.010: 200 resamples)"
    e = {"a": 0.1, "b": 0.2, "diff": -0.1, "ci95": [-0.15, -0.05], "p_value": 0.0}
    md = render_comparisons({"more vs multitask": {"all_average": {"ece_10": e}}}, 200)
    assert "p < 0.010 *" in md and "p < 0.001" not in md
    assert "its 95% interval excludes 0 AND p < 0.05" in md and "p moves in steps of 0.010" in md
    s = win_lose_sentence("x", {"win": 0.6, "tie": 0.1, "lose": 0.3}, {"diff": 0.3, "ci95": [0.1, 0.5], "p_value": 0})
    assert "95% CI +10.0 to +50.0; p < 0.001)" in s


def test_report_states_the_whole_rule_where_it_uses_it(tmp_path):
    """The calibration section's introduction names both conditions (and p's resolution with 200 resamples);
    the sentence under it says which condition failed."""
    recipe = C.load_recipe("tiny-cpu")
    d = fake_calibration_dir(tmp_path)
    entry = {"a": 0.55, "b": 0.5937, "diff": -0.0437, "ci95": [-0.0846, -0.0028], "p_value": 0.05}
    (d / "calibration" / "comparisons.json").write_text(
        json.dumps({"more vs multitask": {"all_average": {"accuracy": entry}}})
    )
    _manifest(d, C.to_plain(recipe.data))
    md = report.render_report(recipe, d)[0]
    assert (
        "A difference counts only when its 95% interval excludes 0 AND p < 0.05 (an interval that excludes 0 with "
        "p = 0.050 is not enough); with 200 bootstrap resamples p moves in steps of 0.010"
    ) in md
    assert "p = 0.050 (in steps of 0.010: 200 resamples)): the interval excludes 0 but p is not below 0.05" in md
    assert "a difference counts only when its interval excludes 0;" not in md


# --------------------------------------------------------------------------------------------------
# The configuration shown is what the run used


def test_report_shows_the_recipe_without_the_sections_the_run_did_not_use(tmp_path):
    """A real-data run of reward, calibration and report: the report's configuration has no data.synthetic and
    no align section (recipe.yaml keeps them, and the report says it left them out)."""
    recipe = C.load_recipe("tiny-cpu", [f"data.sources=[{{name: hh, format: jsonl, path: {tmp_path / 'hh.jsonl'}}}]"])
    d = tmp_path / "run"
    d.mkdir()
    (d / "recipe.yaml").write_text(C.recipe_yaml(recipe))
    stages = {"reward": {"status": "done"}, "calibration": {"status": "done"}, "report": {"status": "running"}}
    (d / "manifest.json").write_text(json.dumps({"stages": stages}))
    md = report.render_report(recipe, d)[0]
    shown = md.split("## Configuration (the resolved recipe)")[1]
    assert "\nalign:" not in shown and "  synthetic:" not in shown and "drift_scale" not in shown
    assert "\nreward:" in shown and "\ncalibration:" in shown and "format: jsonl" in shown
    assert "Shown without what this run did not use (align, data.synthetic); recipe.yaml holds it." in shown
    assert "drift_scale" in (d / "recipe.yaml").read_text()  # the file itself is untouched
    # a synthetic run of every stage shows everything
    recipe = C.load_recipe("tiny-cpu")
    (d / "recipe.yaml").write_text(C.recipe_yaml(recipe))
    stages["align"] = {"status": "done"}
    (d / "manifest.json").write_text(json.dumps({"stages": stages}))
    shown = report.render_report(recipe, d)[0].split("## Configuration (the resolved recipe)")[1]
    assert "\nalign:" in shown and "drift_scale" in shown and "Shown without" not in shown
