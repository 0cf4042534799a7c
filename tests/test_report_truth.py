"""What report.md says about a run is true: the sources of "What ran" (no metrics.json key taken for a source,
group_by sources with their parent's format, path and column), the significance rule stated whole where it is
used, the configuration it shows (only the sections the run used)."""

from __future__ import annotations

import json

import pipeline.config as C
import pipeline.report.stage as report


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
