"""The report stage: sentences computed from the numbers, graceful degradation, paper constants."""

from __future__ import annotations

import json

import pytest

import pipeline.config as C
import pipeline.report.stage as report
import pipeline.stages as stages
from pipeline.report import config as report_config
from pipeline.report.calibration_section import compare_sentence
from pipeline.report.config import ReportConfig, paper_rows
from pipeline.report.facts import format_count, safetensors_param_count
from pipeline.report.sections import synthetic_truth_paragraph, win_tie_lose_sentence


def test_compare_sentence_without_an_interval_gives_no_verdict():
    s = compare_sentence("ECE", 0.03, 0.05, lower_is_better=True)
    assert s.startswith("ECE: MORE 0.0300 vs MultiTask 0.0500 (difference -0.0200;") and "no verdict" in s
    s = compare_sentence("Accuracy", 61.0, 60.0, lower_is_better=False, unit="%")
    assert "difference +1.00%" in s and "higher is better" in s
    for more, base in ((0.03, 0.05), (0.07, 0.05)):
        assert "is better than" not in compare_sentence("ECE", more, base, lower_is_better=True)
    assert "equal" in compare_sentence("x", 0.5, 0.5, lower_is_better=True)
    assert "not available" in compare_sentence("x", None, 0.5, lower_is_better=True)
    assert "not available" in compare_sentence("x", float("nan"), 0.5, lower_is_better=True)


def test_win_tie_lose_sentence_needs_an_interval_that_excludes_zero():
    # 40% vs 35% of 200 prompts: win - lose +5 points, but its 95% interval spans 0 -> not a win
    s = win_tie_lose_sentence("rjs", {"win": 0.4, "tie": 0.25, "lose": 0.35, "n": 200})
    assert "win 40% / tie 25% / lose 35% of 200 prompts; no significant difference" in s and "wins more" not in s
    s = win_tie_lose_sentence("rjs", {"win": 0.6, "tie": 0.1, "lose": 0.3, "n": 200})
    assert "the first policy wins more often than it loses (win - lose +30.0 points, 95% CI +" in s
    s = win_tie_lose_sentence("rjs", {"win": 30, "tie": 20, "lose": 50, "counts": {"win": 60, "tie": 40, "lose": 100}})
    assert "win 30%" in s and "loses more often" in s
    assert "no interval, so no verdict" in win_tie_lose_sentence("rjs", {"win": 0.6, "tie": 0.1, "lose": 0.3})


def test_paper_rows_pick_the_matching_base():
    cfg = ReportConfig()
    assert paper_rows(cfg, "EleutherAI/pythia-1.4b") == ["pythia-1.4b"]
    assert paper_rows(cfg, "meta-llama/Llama-2-7b-hf") == ["llama2-7b"]
    assert paper_rows(cfg, None) == ["pythia-1.4b", "pythia-2.8b", "llama2-7b"]
    assert paper_rows(ReportConfig(paper_model="none"), "x") == []
    assert paper_rows(ReportConfig(paper_model="pythia-2.8b"), None) == ["pythia-2.8b"]
    with pytest.raises(ValueError, match="report.paper_model"):
        ReportConfig(paper_model="gpt-4")


def test_paper_constants_match_the_paper():
    # MORE.md, Table 2 and Table 1 (Zeng et al. 2023)
    assert report_config.PAPER_TABLE2["pythia-1.4b"]["multitask"] == (62.38, 0.0541)
    assert report_config.PAPER_TABLE2["llama2-7b"]["more"] == (70.32, 0.0458)
    assert report_config.PAPER_TABLE1["pythia-2.8b"]["hh_ece"] == (0.0145, 0.0078)
    assert report_config.PAPER_TABLE1["llama2-7b"]["rjs_win_tie_lose"] == (45, 23, 32)
    for m in report_config.PAPER_TABLE1.values():
        assert sum(m["rjs_win_tie_lose"]) == 100


def _metrics(ece_more, ece_mt, acc_more=0.6, acc_mt=0.61):
    def entry(acc, ece, mae):
        return {
            "accuracy": acc,
            "ece_10": ece,
            "truth": {"prob_mae": mae, "ece_vs_truth_10": ece / 2},
            "truth_gold": {"prob_mae": mae + 0.01},
            "temperature_scaled": {"ece_10": ece / 3},
        }

    return {
        "more": {
            "helpful": entry(acc_more, ece_more, 0.1),
            "all_average": entry(acc_more, ece_more, 0.1),
            "hh_average": entry(acc_more, ece_more + 0.01, 0.1),
        },
        "multitask": {
            "helpful": entry(acc_mt, ece_mt, 0.2),
            "all_average": entry(acc_mt, ece_mt, 0.2),
            "hh_average": entry(acc_mt, ece_mt + 0.01, 0.2),
        },
        "single-helpful": {"all_average": entry(0.55, 0.09, 0.3)},
    }


def use_real_report_section(monkeypatch) -> None:
    """The fake stage table, with the real report stage (its section class and its run)."""
    real = stages.Stage("report", ReportConfig, report.run, reads_data=False, follows_upstream=True)
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES[:3], real))


def _recipe(fakes, *ov):  # noqa: F811
    return C.load_recipe(str(fakes / "fake.yaml"), list(ov))


def test_report_with_every_part(fakes, tmp_path, monkeypatch):  # noqa: F811
    use_real_report_section(monkeypatch)
    recipe = _recipe(fakes)
    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    (d / "reward" / "more").mkdir(parents=True)
    (d / "align").mkdir()
    (d / "reward" / "index.json").write_text(
        json.dumps(
            {
                "more": {"path": str(d / "reward" / "more"), "method": "more", "sources": ["a", "b"]},
                "multitask": {"path": "x", "method": "multitask", "sources": ["a", "b"]},
            }
        )
    )
    (d / "reward" / "more" / "reward_info.json").write_text(json.dumps({"n_train_pairs": 123}))
    (d / "calibration" / "metrics.json").write_text(json.dumps(_metrics(0.07, 0.05)))
    (d / "calibration" / "table.md").write_text("# Reward-model calibration\n\n## Table X\n\n| a |\n|---|\n| 1 |\n")
    (d / "calibration" / "reliability.png").write_bytes(b"\x89PNG")
    (d / "align" / "judgements.json").write_text(
        json.dumps(
            {
                "rjs: more vs multitask": {
                    "helpful": {"win": 0.5, "tie": 0.2, "lose": 0.3, "n": 10},
                    "harmless": {"win": 0.3, "tie": 0.2, "lose": 0.5, "n": 10},
                }
            }
        )
    )
    (d / "align" / "table.md").write_text("# Alignment\n\n| x |\n")
    (d / "recipe.yaml").write_text(C.recipe_yaml(recipe))  # the orchestrator writes it before any stage
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "stages": {"reward": {"status": "done"}, "report": {"status": "running"}},  # pipeline order
                "versions": {"torch": "9"},
                "git_commit": "abc",
            }
        )
    )
    arts = report.run(recipe, d)
    assert arts == ["report.md", "report.json"]
    md = (d / "report.md").read_text()
    # without comparisons.json there is no interval, hence no verdict
    assert "ECE (M=10), all sources: MORE 0.0700 vs MultiTask 0.0500 (difference +0.0200;" in md
    assert "better than" not in md and "is better here" not in md
    assert "single-helpful acc 55.00% / ECE 0.0900" in md
    assert "### Table X" in md and "# Reward-model calibration" not in md  # nested, demoted
    assert "![reliability](calibration/reliability.png)" in md
    assert "rjs: more vs multitask, helpful prompts: win 50% / tie 20% / lose 30% of 10 prompts" in md
    assert "no significant difference between the two policies (win - lose +20.0 points, 95% CI" in md
    assert "| more | more | a, b | 123 | - |" in md
    assert "| paper, pythia-1.4b | 62.38 | 0.0541 | 63.34 | 0.0364 | 0.0177 -> 0.0109 | 44/22/34 |" in md
    assert "| **this run** | 61.00 | 0.0500 | 60.00 | 0.0700 | 0.0600 -> 0.0800 | 40/20/40 |" in md
    assert md.index("| reward |") < md.index("| report | writing this report |")  # the manifest's order
    assert "```yaml" in md and "name: fake" in md and "git abc" in md
    data = json.loads((d / "report.json").read_text())
    assert data["calibration"]["rms"]["more"]["all_average"]["ece"] == 0.07
    assert data["rjs_more_vs_baseline"] == {"win": 40.0, "tie": 20.0, "lose": 40.0}  # mean over the sets

    # with an "all" prompt set, that one is summarized
    j = json.loads((d / "align" / "judgements.json").read_text())
    j["rjs: more vs multitask"]["all"] = {"win": 0.45, "tie": 0.1, "lose": 0.45, "n": 20}
    (d / "align" / "judgements.json").write_text(json.dumps(j))
    report.run(recipe, d)
    assert json.loads((d / "report.json").read_text())["rjs_more_vs_baseline"] == {
        "win": 45.0,
        "tie": 10.0,
        "lose": 45.0,
    }
    md = (d / "report.md").read_text()
    assert "rjs: more vs multitask, all prompts: win 45%" in md and "helpful prompts: win 50%" not in md
    assert not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp"))

    # with paired comparisons: a verdict only where the 95% interval excludes 0
    def e(a, b, lo, hi):
        return {"a": a, "b": b, "diff": a - b, "ci95": [lo, hi], "p_value": 0.01 if lo > 0 or hi < 0 else 0.4}

    comps = {
        "more vs multitask": {
            "all_average": {"ece_10": e(0.03, 0.05, -0.03, -0.01), "accuracy": e(0.62, 0.61, -0.01, 0.03)},
            "hh_average": {"ece_10": e(0.04, 0.041, -0.02, 0.02)},
        }
    }
    (d / "calibration" / "comparisons.json").write_text(json.dumps(comps))
    (d / "calibration" / "comparisons.md").write_text("# Paired comparisons\n\n## more vs multitask\n")
    report.run(recipe, d)
    md = (d / "report.md").read_text()
    assert (
        "ECE (M=10), all sources: MORE's is lower than MultiTask's by 0.0200 (95% CI 0.0100 to 0.0300; "
        "p = 0.010): MORE is better here."
    ) in md
    assert (
        "Accuracy, all sources: no significant difference between MORE and MultiTask (difference +1.00 points, "
        "95% CI -1.00 to +3.00; p = 0.400)."
    ) in md
    assert "ECE (M=10), Helpful & Harmless: no significant difference between MORE and MultiTask" in md
    assert md.count("better here") == 1 and "### more vs multitask" in md
    assert json.loads((d / "report.json").read_text())["sentences"][0].startswith("ECE (M=10), all sources: MORE's")


def test_report_degrades_when_stages_did_not_run(fakes, tmp_path, monkeypatch):  # noqa: F811
    use_real_report_section(monkeypatch)
    recipe = _recipe(fakes, "report.include_recipe=false", "report.title=My run")
    d = tmp_path / "empty"
    report.run(recipe, d)
    md = (d / "report.md").read_text()
    assert md.startswith("# My run")
    assert "The reward stage has not run" in md
    assert "The calibration stage has not run" in md
    assert "The alignment stage has not run" in md
    assert "| **this run** | - | - | - | - | - | - |" in md
    assert "```yaml" not in md


def test_report_without_more_or_baseline(fakes, tmp_path, monkeypatch):  # noqa: F811
    use_real_report_section(monkeypatch)
    recipe = _recipe(fakes, "report.paper_model=none")
    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    m = _metrics(0.1, 0.1)
    m.pop("more")
    (d / "calibration" / "metrics.json").write_text(json.dumps(m))
    report.run(recipe, d)
    md = (d / "report.md").read_text()
    assert "were not both evaluated" in md and "paper's numbers" not in md


def test_synthetic_truth_paragraph_uses_the_run_config():
    from pipeline import data

    cfg = data.DataConfig()
    text = synthetic_truth_paragraph(cfg)
    assert "drift_scale = 1.0" in text and "| summarize |" in text and "true_prob" in text
    cfg.synthetic.drift_scale = 0.0
    assert "drift_scale = 0.0" in synthetic_truth_paragraph(cfg)
    real = data.DataConfig(sources=[data.SourceSpec(name="x", format="jsonl", path="x.jsonl")])
    assert synthetic_truth_paragraph(real) is None


def _save_tiny(path, tiny_tok):
    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(arch="gpt_neox"), tiny_tok, task="reward", seed=0)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def test_safetensors_param_count_equals_the_models_own_count(tiny_tok, tmp_path):
    n = _save_tiny(tmp_path / "rm", tiny_tok)
    assert safetensors_param_count(tmp_path / "rm") == n
    assert safetensors_param_count(tmp_path / "rm" / "model.safetensors") == n
    assert safetensors_param_count("owner/hub-model") is None
    assert format_count(1_400_000_000) == "1.4B" and format_count(412_345) == "412k"
    assert format_count(None) == "unknown"


def _manifest(d, data):
    stage = {"status": "done", "inputs": {"seed": 0, "data": data}}
    align = {"status": "done", "stale": "upstream stage calibration reruns"}
    stages = {"calibration": stage, "align": align, "report": {"status": "running"}}
    (d / "manifest.json").write_text(json.dumps({"stages": stages}))


def test_report_of_a_synthetic_run_describes_it_and_says_the_paper_is_not_comparable(tiny_tok, tmp_path):
    recipe = C.load_recipe("tiny-cpu")
    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    n = _save_tiny(d / "reward" / "more", tiny_tok)
    (d / "reward" / "index.json").write_text(
        json.dumps({"more": {"path": "reward/more", "method": "more", "sources": ["helpful", "harmless"]}})
    )
    sizes = {"helpful": {"train": 2000, "validation": 200, "test": 400}, "harmless": {"train": 2000}}
    (d / "reward" / "data.json").write_text(json.dumps(sizes))
    (d / "calibration" / "metrics.json").write_text(json.dumps({"more": {"helpful": {"n_pairs": 400}}}))
    _manifest(d, C.to_plain(recipe.data))
    md = report.render_report(recipe, d)[0]
    body = md.split("## Configuration (the resolved recipe)")[0]  # the recipe itself is appended verbatim
    assert recipe.description.strip()[:40] not in body  # the recipe's own words are not repeated as fact
    assert "| helpful | synthetic | synthetic benchmark | - | 2000 | 200 | 400 |" in md
    assert f"| more | yes, more | `tiny model built in-process (random init)` | {format_count(n)} |" in md
    assert "**Not comparable as is.**" in md and "synthetic benchmark (2 sources), not the paper's real" in md
    assert f"reward models have {format_count(n)} parameters; the paper's rows are pythia-1.4b (1.4B)" in md
    assert md.index("Not comparable") < md.index("| paper, pythia-1.4b |")
    assert "| align | done, **STALE** (upstream stage calibration reruns; rerun it with --stages align) |" in md


def test_report_of_an_rm_eval_on_topic_buckets_names_them_not_the_paper_datasets(tiny_tok, tmp_path):
    recipe = C.load_recipe("rm-eval", [f"data_root={tmp_path}", "report.paper_model=all"])
    d = tmp_path / "run"
    (d / "calibration").mkdir(parents=True)
    n = _save_tiny(tmp_path / "mine", tiny_tok)
    (d / "calibration" / "config.json").write_text(json.dumps({"external": {"mine": str(tmp_path / "mine")}}))
    topics = ["hh/code", "hh/math", "hh/travel"]
    (d / "calibration" / "metrics.json").write_text(
        json.dumps({"mine": {**{t: {"n_pairs": 78} for t in topics}, "all_average": {"accuracy": 0.6}}})
    )
    # what the run used: ONE trl file split by a column, not the recipe's five sources
    data = C.to_plain(recipe.data)
    data["sources"] = [{"name": "hh", "format": "trl", "path": "/data/hh.parquet", "options": {"group_by": "topic"}}]
    _manifest(d, data)
    md = report.render_report(recipe, d)[0]
    body = md.split("## Configuration (the resolved recipe)")[0].split("## The paper's numbers")[0]
    assert "TL;DR test data" not in body and "OASST1, WebGPT" not in body
    for t in topics:
        assert f"| {t} | trl | `/data/hh.parquet` | topic | - | - | 78 |" in md
    assert f"| mine | no (external) | `{tmp_path / 'mine'}` | {format_count(n)} |" in md
    assert "data: this run used 3 source(s) (hh/code [trl], hh/math [trl], hh/travel [trl]); the paper used 5" in md


def test_stale_sections_carry_a_banner_beside_their_numbers(fakes, tmp_path, monkeypatch):  # noqa: F811
    """Issue 28, item 5: after a retrain (reward reran, calibration and align not selected) the old numbers were
    marked STALE only in the stage table; every section showing them now says so, with the refreshing command."""
    import pipeline.run as R

    use_real_report_section(monkeypatch)
    d = tmp_path / "run"
    R.run_pipeline(_recipe(fakes), d)
    (d / "calibration" / "metrics.json").write_text(json.dumps(_metrics(0.07, 0.05)))
    (d / "calibration" / "more_weights_more.png").write_bytes(b"\x89PNG")
    (d / "align" / "judgements.json").write_text(
        json.dumps({"rjs: more vs multitask": {"all": {"win": 0.5, "tie": 0.2, "lose": 0.3, "n": 10}}})
    )
    R.run_pipeline(_recipe(fakes), d, stages="report", force=["report"])
    assert "STALE" not in (d / "report.md").read_text()

    R.run_pipeline(_recipe(fakes, "reward.steps=3"), d, stages="reward")  # a retrain; the report follows
    md = (d / "report.md").read_text()
    cal, rest = md.split("## Calibration", 1)[1].split("## Alignment", 1)
    align, paper = rest.split("## The paper's numbers side by side", 1)
    refresh = f"`python -m pipeline.run --recipe {d}/recipe.yaml --output-dir {d} --stages calibration`"
    assert cal.lstrip().startswith("> **STALE** (upstream stage reward reruns)") and refresh in cal
    plots = cal.split("### Plots", 1)[1]
    assert plots.lstrip().startswith("> **STALE**") and plots.index("STALE") < plots.index("more_weights_more")
    assert align.lstrip().startswith("> **STALE** (upstream stage reward reruns)") and "--stages align" in align
    assert "**STALE**" in paper.split("| **this run**")[0]
    banners = json.loads((d / "report.json").read_text())["banners"]
    assert set(banners) == {"calibration", "align"}

    R.run_pipeline(_recipe(fakes, "reward.steps=3"), d, stages="calibration,align")  # refreshed: no banner
    assert "STALE" not in (d / "report.md").read_text()


def test_what_ran_states_each_rms_real_training_settings(tmp_path, monkeypatch):
    """Issue 28, item 1: the report described the recipe of the last command (learning_rate 0.001, no
    normalize) for RMs trained with 5e-4 / none. "What ran" now reads each RM's own fingerprint.json, and the
    reward stage's `mismatch` names every fingerprinted key on which a recipe disagrees with the saved RMs."""
    from pipeline.report.provenance import rm_training_lines
    from pipeline.reward import stage as reward_stage
    from tests.helpers import one_rm_recipe

    trained = one_rm_recipe(learning_rate=5e-4, normalize="none")
    trained.reward.methods = ["more", "multitask"]
    reward_stage.run(trained, tmp_path)
    text = "\n".join(rm_training_lines(tmp_path))
    assert "read from its own `reward/<rm>/fingerprint.json` (not from the recipe)" in text
    more = next(line for line in text.splitlines() if line.startswith("| more |"))
    assert "alpha 0.99, normalize none" in more and "| 0.0005 (linear, warmup 0) |" in more
    assert "| 3 max steps (3 steps run) | 4 pairs | 32 pairs from 2 source(s) | max_length 96, left | 0 |" in more
    multitask = next(line for line in text.splitlines() if line.startswith("| multitask |"))
    assert "normalize" not in multitask and "| 0.0005 (linear, warmup 0) |" in multitask

    assert reward_stage.mismatch(trained, tmp_path) == []
    later = one_rm_recipe(learning_rate=1e-3)  # the overrides not repeated
    later.reward.methods = ["more", "multitask"]
    later.reward.lora_r = 4  # not read without reward.peft: no disagreement
    later.data.max_length = 64
    assert reward_stage.mismatch(later, tmp_path) == [
        {"key": "data.max_length", "recipe": 64, "recorded": {"96": ["more", "multitask"]}},
        {"key": "reward.train.learning_rate", "recipe": 0.001, "recorded": {"0.0005": ["more", "multitask"]}},
        {"key": "reward.train.normalize", "recipe": "l2", "recorded": {'"none"': ["more"]}},
    ]
