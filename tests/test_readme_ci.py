"""CI runs the README's Quick start block as written (.ci/run via scripts/readme_block.py) and checks the run
directory it wrote (scripts/check_run.py). These tests pin the extraction on the real README and show that
the checker names each kind of broken run (a failed or stale stage, a missing artifact, a bad PNG, a
non-finite metric)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_ci_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_start_block_holds_the_demo_and_the_suite_and_ci_runs_it():
    block = _script("readme_block").code_block((REPO / "README.md").read_text(encoding="utf-8"), "Quick start")
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert any("python -m pipeline.run --recipe tiny-cpu" in ln for ln in lines)
    assert any(ln.startswith("python -m pytest -q -n 2 --dist worksteal tests") for ln in lines)
    assert _script("check_run").dirs_from_block(block) == ["runs/tiny-cpu"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert 'readme_block.py README.md "Quick start"' in ci and "check_run.py --from-block" in ci


def test_code_block_takes_the_first_block_under_its_heading_only():
    rb = _script("readme_block")
    text = "# T\n\n## Quick start\n\ntext\n\n```bash\na\nb\n```\n\n```bash\nc\n```\n## Next\n```\nd\n```\n"
    assert rb.code_block(text, "Quick start") == "a\nb\n"
    with pytest.raises(LookupError, match="no heading"):
        rb.code_block(text, "Missing")
    with pytest.raises(LookupError, match="no complete code block"):
        rb.code_block("## Quick start\ntext\n## Next\n```\nd\n```\n", "Quick start")
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "readme_block.py"), str(REPO / "README.md"), "Nope"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no heading 'Nope'" in out.stderr


def _good_run(root: Path) -> Path:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 3000
    (root / "calibration").mkdir(parents=True)
    (root / "reward").mkdir()
    (root / "calibration" / "reliability.png").write_bytes(png)
    block = {"accuracy": 0.6, "ece_10": 0.05}
    (root / "calibration" / "metrics.json").write_text(json.dumps({"more": {"helpful": block}}))
    (root / "reward" / "index.json").write_text(json.dumps({"more": {}}))
    (root / "report.md").write_text("# Report\n\n## What ran\n" + "x" * 300)
    stages = {
        "reward": {"status": "done", "artifacts": ["reward/index.json"]},
        "calibration": {"status": "done", "artifacts": ["calibration/metrics.json"]},
        "report": {"status": "done", "artifacts": ["report.md"]},
    }
    (root / "manifest.json").write_text(json.dumps({"stages": stages}))
    return root


def test_check_run_accepts_a_complete_run_and_names_every_problem(tmp_path):
    cr = _script("check_run")
    good = _good_run(tmp_path / "good")
    assert cr.problems(good) == []
    assert cr.main([str(good)]) == 0

    bad = _good_run(tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["stages"]["calibration"].update(status="failed", error="ValueError: 'yerr' must not contain negative")
    manifest["stages"]["report"]["stale"] = "upstream stage reward reruns"
    manifest["stages"]["reward"]["artifacts"].append("reward/more")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    found = cr.problems(bad)
    assert any("calibration is 'failed'" in p and "yerr" in p for p in found)
    assert any("STALE" in p for p in found) and any("reward/more is missing" in p for p in found)

    broken = _good_run(tmp_path / "broken")
    (broken / "calibration" / "reliability.png").write_bytes(b"not a png")
    (broken / "calibration" / "metrics.json").write_text(json.dumps({"more": {"helpful": {"accuracy": float("nan")}}}))
    (broken / "reward" / "index.json").write_text(json.dumps({"more": {}, "multitask": {}}))
    found = cr.problems(broken)
    assert any("reliability.png is not a real PNG" in p for p in found)
    assert any("more/helpful/accuracy" in p for p in found) and any("no entry for RM multitask" in p for p in found)
    assert cr.main([str(broken)]) == 1
    assert cr.problems(tmp_path / "nothing") == [
        f"{tmp_path / 'nothing' / 'manifest.json'} is missing: the run did not start or wrote nothing"
    ]


def test_the_readme_trl_example_runs_as_written(tmp_path, monkeypatch):
    """The README's MORERewardTrainer example, with `model_path` and `tokenizer` set to a tiny local model."""
    from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer

    code = _script("readme_block").code_block(
        (REPO / "README.md").read_text(encoding="utf-8"), "MORERewardTrainer in your own TRL script"
    )
    tok = tiny_tokenizer(
        ["Is the sky blue? Yes, on a clear day. How do I pick a lock? Sure, no."] * 20, vocab_size=200
    )
    base = tmp_path / "base"
    tiny_model(TinyModelSpec(arch="llama"), tok, task="causal_lm").save_pretrained(base)
    tok.save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    namespace = {"model_path": str(base), "tokenizer": tok}
    exec(compile(code, "README example", "exec"), namespace)  # noqa: S102 - the README's code, as a user runs it
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 4 and trainer.num_sources == 2
    assert (tmp_path / "rm-more" / "README.md").read_text().count("def reward(") == 1


def test_the_readme_quotes_the_demo_time_of_the_benchmark_table():
    """One tiny-cpu time everywhere: the Quick start and the recipe table quote docs/benchmarks.json's demo run."""
    bench = json.loads((REPO / "docs" / "benchmarks.json").read_text())
    demo = next(e for e in bench["results"] if e["command"].startswith("python scripts/bench_demo.py"))
    seconds, date = round(demo["result"]["seconds"]), bench["date"][:10]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"**{seconds} s** on 2 quiet cores" in readme and f"({date}," in readme
    row = next(ln for ln in readme.splitlines() if ln.startswith("| `tiny-cpu` |"))
    assert f"{seconds} s ({date}" in row
