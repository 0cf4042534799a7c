"""The report stage: DIR/report.md, a readable summary of one run next to the paper's numbers.

    python -m pipeline.report --recipe tiny-cpu --output-dir runs/tiny-cpu

It only reads what the other stages wrote (every part is optional, so a run that stopped after the
reward stage still gets a report saying what is missing):

* DIR/manifest.json            stage status, versions, git commit
* DIR/reward/index.json        the trained RMs (+ <rm>/reward_info.json)
* DIR/calibration/metrics.json the numbers compared here (MORE vs MultiTask, single-source, Averaging),
  DIR/calibration/table.md     included as is, and DIR/calibration/*.png linked
* DIR/align/judgements.json    win/tie/lose of the aligned policies, DIR/align/table.md included

The comparison sentences are computed from DIR/calibration/comparisons.json, never written in advance: a
difference is called real ("MORE's ECE ... is lower than MultiTask's by 0.018 (95% CI ...)") only when its
paired 95% bootstrap interval excludes 0 AND p < 0.05 (`pipeline.stats.is_significant`), else "no significant
difference ..." (saying which condition failed when only one did); the same rule applies to alignment win rates
(the interval of win - lose). Without intervals the numbers are shown with no verdict.
The paper's numbers (Zeng et al., "On Diversified Preferences of Large Language Model Alignment", arXiv
2312.07401, Tables 1 and 2) are constants below, for comparison only. Written atomically (DIR/report.md and DIR/report.json) by the main
process.

Where the parts live: `config` (ReportConfig, the paper's numbers), `facts` (what ran), `provenance` (each RM's
real training settings from its own files; the STALE and --allow-stale-upstream banners beside the numbers),
`sections` (header, synthetic benchmark, reward models, alignment, the paper side by side),
`calibration_section` (the sentences on what the run measured). This module holds `render_report`, `run` and `estimate`; the report package imports the
stage packages before it (`pipeline.calibration`) and the leaves, never `pipeline.config`, `pipeline.run` or
`pipeline.stages`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.io import atomic_write_json, atomic_write_text, read_json
from pipeline.logs import say
from pipeline.report.calibration_section import calibration_section
from pipeline.report.facts import run_facts, stage_setting, what_ran_section
from pipeline.report.notes import demo_policy_lines, more_two_source_lines, used_recipe_text
from pipeline.report.provenance import rm_training_lines, stage_banner, with_banner
from pipeline.report.sections import (
    align_section,
    header_section,
    paper_section,
    read_text_or_none,
    reward_section,
    rjs_more_vs_base,
    synthetic_truth_paragraph,
)


def render_report(recipe, run_dir: Path) -> tuple[str, dict]:
    """The report's markdown and the numbers behind its sentences (report.json)."""
    run_dir = Path(run_dir)
    cfg = recipe.report
    manifest = read_json(run_dir / "manifest.json")
    headline = stage_setting(recipe, "calibration", "headline_bins")
    cal_cfg = read_json(run_dir / "calibration" / "config.json") or {}
    headline = int(cal_cfg.get("headline_bins", headline or 10))

    lines = header_section(recipe, cfg, run_dir, manifest)
    facts = run_facts(recipe, run_dir, manifest)
    lines += what_ran_section(facts)
    lines += rm_training_lines(run_dir, manifest)
    truth = synthetic_truth_paragraph(recipe.data)
    if truth:
        lines += ["## The synthetic benchmark: what is true here", "", truth, ""]
    lines += reward_section(run_dir)
    lines += more_two_source_lines(run_dir)
    cal_lines, summary = calibration_section(run_dir, cfg, headline)
    banners = {s: stage_banner(manifest, s, run_dir) for s in ("calibration", "align")}
    lines += with_banner(cal_lines, banners["calibration"], ("### Plots",))
    align_lines, judgements = align_section(run_dir)
    align_lines[2:2] = demo_policy_lines(run_dir, facts) if judgements else []  # under the section's title
    lines += with_banner(align_lines, banners["align"])
    lines += with_banner(
        paper_section(cfg, recipe, summary, judgements, facts), banners["calibration"] + banners["align"]
    )
    recipe_text = read_text_or_none(run_dir / "recipe.yaml") if cfg.include_recipe else None
    if recipe_text:  # the settings each stage's results here were produced with (the orchestrator writes it)
        recipe_text, unused = used_recipe_text(recipe_text, manifest)
        lines += [
            "## Configuration (the resolved recipe)",
            "",
            "Each stage's settings as it last ran in this directory (not the last command's recipe). Rerun exactly: "
            "`python -m pipeline.run --recipe <run dir>/recipe.yaml --output-dir <new dir>`.",
            "",
            *(
                [f"Shown without what this run did not use ({', '.join(unused)}); recipe.yaml holds it.", ""]
                if unused
                else []
            ),
            "```yaml",
            recipe_text.rstrip(),
            "```",
            "",
        ]
    data = {
        "run": facts,
        "calibration": summary,
        "rjs_more_vs_baseline": rjs_more_vs_base(judgements, cfg.baseline),
        "sentences": summary.get("sentences", []) if summary else [],
        "banners": {stage: [b for b in banner if b] for stage, banner in banners.items() if banner},
    }
    return "\n".join(lines), data


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Write DIR/report.md and DIR/report.json (main process only)."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") == "0":
        text, data = render_report(recipe, run_dir)
        atomic_write_text(run_dir / "report.md", text)
        atomic_write_json(run_dir / "report.json", data)
        say("report", f"wrote {run_dir / 'report.md'}")
    return ["report.md", "report.json"]


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    return "report: no optimizer steps", None
