"""Alignment on real data: --dry-run catches the synthetic gold judge on real prompts, and report.md says when the
policy is the tiny demo policy, whose samples on real prompts are not meaningful text."""

from __future__ import annotations

import json

import pipeline.config as C
import pipeline.report.stage as report
import pipeline.run as R


def _real_pairs(path, n: int = 40):
    rows = [
        {
            "prompt": f"\n\nHuman: question {i} about topic {i % 7}?\n\nAssistant:",
            "chosen": f" answer {i}",
            "rejected": " no",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _real_sources(tmp_path) -> str:
    h, m = _real_pairs(tmp_path / "helpful.jsonl"), _real_pairs(tmp_path / "harmless.jsonl")
    return f"data.sources=[{{name: helpful, format: jsonl, path: {h}}}, {{name: harmless, format: jsonl, path: {m}}}]"


def test_dry_run_refuses_the_synthetic_gold_judge_on_real_prompts(tmp_path, capsys):
    argv = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", _real_sources(tmp_path)]
    assert R.main(argv) == 2
    err = capsys.readouterr().err
    assert "align.judge.gold=synthetic" in err and "align.eval_sources has real data: helpful (jsonl)" in err
    assert "align.judge.kind=openai" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "align").exists()
    # the fixes named pass the check: no judge, or a judge that is not the synthetic gold reward
    assert R.main([*argv, "align.judge.kind=none"]) == 0
    # and a run that never aligns is not held to it
    assert R.main([*argv, "--stages", "reward,calibration,report"]) == 0


def _aligned_run(tmp_path, formats: dict[str, str], perplexity: dict[str, float], sample: str):
    recipe = C.load_recipe("tiny-cpu")
    d = tmp_path / "run"
    base = d / "align" / "base"
    (base / "policy").mkdir(parents=True)
    (base / "policy.settings.json").write_text(json.dumps({"stamp": "x"}))
    (base / "perplexity.json").write_text(json.dumps({"stamp": "x", "perplexity": perplexity}))
    rows = [
        {"prompt": f"\n\nHuman: What is the capital of France? ({s})\n\nAssistant:", "set": s, "candidates": [sample]}
        for s in formats
    ]
    (base / "eval_candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    j = {"best_of_n: more vs multitask": {"all": {"win": 0.3, "tie": 0.4, "lose": 0.3, "n": 100}}}
    (d / "align" / "judgements.json").write_text(json.dumps(j))
    data = C.to_plain(recipe.data)
    data["sources"] = [
        {"name": s, "format": f, "path": f"/data/{s}" if f != "synthetic" else None} for s, f in formats.items()
    ]
    stage = {"status": "done", "inputs": {"seed": 0, "data": data}}
    (d / "manifest.json").write_text(json.dumps({"stages": {"calibration": stage, "report": {"status": "running"}}}))
    return report.render_report(recipe, d)[0]


def test_report_says_the_tiny_policy_on_real_prompts_writes_no_meaningful_text(tmp_path):
    gibberish = "kk zq the the ,, [1] zz Hope Hope"
    md = _aligned_run(
        tmp_path, {"helpful": "hh-rlhf", "harmless": "hh-rlhf"}, {"helpful": 8123.4, "harmless": 9001.0}, gibberish
    )
    section = md.split("## Alignment")[1]
    caveat = section.split("- best_of_n")[0]
    assert "**The policy is the tiny demo policy" in caveat
    assert "Its samples on this run's real prompts (helpful, harmless) are not meaningful text**" in caveat
    assert "perplexity on those sources' test answers is 8123.4 (helpful), 9001.0 (harmless)" in caveat
    assert gibberish in caveat and "capital of France" in caveat
    assert "they say nothing about how these reward models would align a real policy" in caveat
    # the verdicts still follow, under the rule stated whole
    assert "only when its 95% interval excludes 0 AND p < 0.05" in section
    assert "best_of_n: more vs multitask, all prompts: win 30%" in section


def test_report_names_the_tiny_policy_on_synthetic_prompts_without_the_caveat(tmp_path):
    md = _aligned_run(tmp_path, {"helpful": "synthetic", "harmless": "synthetic"}, {"helpful": 1.68}, " It is 6.")
    section = md.split("## Alignment")[1]
    assert "The policy is the tiny demo policy (built in this run" in section
    assert "perplexity on the judged sources' test answers: 1.7 (helpful)" in section
    assert "not meaningful text" not in section
