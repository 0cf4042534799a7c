"""scripts/study_report.py: docs/results.md is computed from the committed sweep summaries, with the
interval rule (better / worse only when the seed-paired 95% interval excludes zero), and a part without a
summary is reported as not run, never filled in."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pipeline.sweep as S


REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_study_report", REPO / "scripts" / "study_report.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)


def _summary() -> dict:
    """One grid point, 3 seeds. MORE - MultiTask ECE10 = -0.020, -0.021, -0.019: interval
    -0.020 +- 4.303 * 0.001 / sqrt(3) = [-0.0225, -0.0175], excludes 0 -> better. Accuracy differences
    +0.01, -0.01, 0.00 -> no significant difference. Uniform was not trained."""
    per_seed = {}
    for seed, (d_ece, d_acc) in enumerate([(-0.020, 0.01), (-0.021, -0.01), (-0.019, 0.0)]):
        base = 0.10 + seed / 100
        per_seed[seed] = [
            ("calibration", "multitask", "all_average", "ece_10", base),
            ("calibration", "more", "all_average", "ece_10", base + d_ece),
            ("calibration", "multitask", "all_average", "accuracy", 0.7),
            ("calibration", "more", "all_average", "accuracy", 0.7 + d_acc),
            ("calibration", "multitask", "all_average", "temperature", 1.5),
            ("calibration", "more", "all_average", "temperature", 1.2),
        ]
    point = S.aggregate_point(per_seed)
    return {
        "sweep": {
            "recipe": "tiny-cpu",
            "seeds": [0, 1, 2],
            "grid": [["data.synthetic.drift_scale", ["1"]]],
            "overrides": ["reward.methods=[more,multitask]"],
        },
        "confidence": 0.95,
        "points": {"drift_scale=1": {"grid": {"data.synthetic.drift_scale": "1"}, "runs": {}, "n_runs": 3, **point}},
    }


def test_results_page_is_computed_from_summaries(tmp_path):
    results = tmp_path / "results"
    (results / "synthetic").mkdir(parents=True)
    (results / "synthetic" / "summary.json").write_text(json.dumps(_summary()))
    (results / "synthetic" / "MACHINE.txt").write_text("date: 2026-12-01\nwall time: 24 min\n")
    (results / "real").mkdir()
    (results / "real" / "NOTE.md").write_text("Not run here: 8.5 s per step.")
    out = tmp_path / "results.md"
    assert R.main(["--results", str(results), "--out", str(out)]) == 0
    md = out.read_text()
    assert not list(tmp_path.glob("*.tmp"))

    assert "- MORE - MultiTask, ECE10, all average: lower (better) at drift_scale=1 (-0.0200)." in md
    assert (
        "- MORE - MultiTask, accuracy, all average: no significant difference at drift_scale=1 (+0.00 points)." in md
    )
    row = next(ln for ln in md.splitlines() if ln.startswith("| drift_scale=1 | 3 | 0.0900 ["))
    assert row.endswith("-0.0200 [-0.0225, -0.0175] **better** |")
    assert "Uniform" not in row  # only the RMs that were trained get columns
    temp_row = [ln for ln in md.splitlines() if ln.startswith("| drift_scale=1 |") and "1.2000" in ln]
    # both T above 1: the one closer to 1 (MORE's 1.2) is better
    assert temp_row and temp_row[0].endswith("-0.3000 [-0.3000, -0.3000] **better** |")
    assert "wall time: 24 min" in md

    sections = md.split("\n## ")
    real = next(s for s in sections if s.startswith("Real data"))
    assert "Not run here: 8.5 s per step." in real and "Not run: no summary was committed" in real
    over = next(s for s in sections if s.startswith("Synthetic benchmark, over-confident"))
    assert "Not run: no summary was committed" in over


def test_the_readme_findings_are_the_generated_block_of_the_committed_summaries(tmp_path):
    """README.md's study findings are exactly what study_report.py computes from docs/results/ (so a new or
    rerun part without a regenerated README fails here), and the block names every significant per-source
    MORE - MultiTask difference of the real-data part with the chance warning (the README once said no source
    differed, while harmless Brier and NLL after scaling did)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(R.README_BEGIN), readme.index(R.README_END) + len(R.README_END)
    block = R.readme_block(REPO / "docs" / "results")
    assert readme[start:end] == block, "regenerate it: python scripts/study_report.py --readme README.md"
    real = block[block.index("**Real data, over-confident regime**") :]
    assert "Source by source, 2 of the 35 MORE - MultiTask differences pass the rule: Brier after" in real
    assert "about 8 would by chance alone" in real
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(block, R.README_BEGIN + "\nstale\n" + R.README_END))
    R.write_readme(copy, REPO / "docs" / "results")
    assert copy.read_text() == readme
