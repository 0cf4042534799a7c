"""End to end: the real `tiny-cpu` recipe through every real stage, as a user runs it, then a rerun.

Sizes are shrunk by command-line overrides (fewer pairs, steps and prompts) so that the test stays
around a minute; the full-size recipe is timed by scripts/bench_demo.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, accelerate_launch_2proc, pipeline_cli, subprocess_env


SMALL = [
    "data.synthetic.n_train=120",
    "data.synthetic.n_valid=40",
    "data.synthetic.n_test=60",
    "calibration.bootstrap_samples=20",
    "align.warm_start_steps=20",
    "align.warm_start_prompts=40",
    "align.n_prompts=24",
    "align.n_eval_prompts=16",
    "align.n_ppl=16",
    "align.max_new_tokens=12",
]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return pipeline_cli("tiny-cpu", out, *SMALL, *extra)


@pytest.mark.slow
def test_tiny_cpu_end_to_end_then_rerun(tmp_path):
    out = tmp_path / "run"
    p = _run(out)
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    done = [s for s, e in m["stages"].items() if e["status"] == "done"]
    assert done == ["policy", "reward", "calibration", "align", "report"]
    for name, e in m["stages"].items():
        for a in e["artifacts"]:
            assert (out / a).exists(), (name, a)
    index = json.loads((out / "reward" / "index.json").read_text())
    assert {"more", "multitask"} <= set(index)
    metrics = json.loads((out / "calibration" / "metrics.json").read_text())
    assert "truth" in metrics["more"]["all_average"]  # the synthetic benchmark's error vs the truth
    md = (out / "report.md").read_text()
    for needle in (
        "## The synthetic benchmark: what is true here",
        "## Calibration",
        "## Alignment",
        "## The paper's numbers side by side",
        "against the true preference probabilities",
    ):
        assert needle in md, needle
    assert "has not run" not in md
    assert not [q for q in out.rglob("*") if q.name.endswith(".tmp")]

    # The same command again: every stage is up to date, nothing reruns.
    before = {s: e["run_id"] for s, e in m["stages"].items()}
    p = _run(out)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stderr.count("SKIP") == 5
    m = json.loads((out / "manifest.json").read_text())
    assert {s: e["run_id"] for s, e in m["stages"].items()} == before

    # A change to the report section reruns only the report.
    p = _run(out, "report.title=Second look")
    assert p.returncode == 0, p.stderr[-4000:]
    m2 = json.loads((out / "manifest.json").read_text())
    assert [s for s in before if m2["stages"][s]["run_id"] != before[s]] == ["report"]
    assert (out / "report.md").read_text().startswith("# Second look")

    # A copy of the run is independent (issue 12, defect 4): recalibrating in the copy writes only there (the
    # retraining of stale RMs, defect 1, is covered at stage level in test_reward_stage.py).
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    snapshot = {q: q.stat().st_mtime_ns for q in out.rglob("*")}
    p = _run(copy, "--stages", "calibration", "--force", "calibration")
    assert p.returncode == 0, p.stderr[-4000:]
    assert {q: q.stat().st_mtime_ns for q in out.rglob("*")} == snapshot
    assert (copy / "reward" / "more" / "temperature.json").stat().st_mtime_ns != (
        out / "reward" / "more" / "temperature.json"
    ).stat().st_mtime_ns
    assert json.loads((copy / "calibration" / "metrics.json").read_text())["more"] == metrics["more"]
    mc = json.loads((copy / "manifest.json").read_text())
    assert all(not a.startswith("/") for e in mc["stages"].values() for a in e["artifacts"])


DPO = [
    "reward.methods=[more,multitask,dpo]",
    "reward.dpo.max_steps=12",
    "align.methods=[best_of_n,policy]",
    "align.comparisons=[more vs multitask, dpo vs base, dpo vs more, more vs base, dpo/policy vs more/best_of_n]",
]


@pytest.mark.slow
def test_tiny_cpu_with_a_dpo_policy_end_to_end(tmp_path):
    """Issue 30, item 2: reward.methods with dpo through every real stage. The DPO policy is trained from the policy
    stage's base policy, calibrated as an implicit RM beside MORE and MultiTask (per-source ECE, paired
    comparisons), used as best-of-n's reward and judged as a policy of its own."""
    out = tmp_path / "run"
    p = _run(out, *DPO)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "training dpo (method=dpo" in p.stdout
    index = json.loads((out / "reward" / "index.json").read_text())
    assert index["dpo"]["kind"] == "implicit" and {"more", "multitask"} <= set(index)
    metrics = json.loads((out / "calibration" / "metrics.json").read_text())
    sources = ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    for rm in ("dpo", "more", "multitask"):
        assert all(isinstance(metrics[rm][s]["ece_10"], float) for s in sources), rm
    assert metrics["dpo"]["all_average"]["accuracy"] != metrics["more"]["all_average"]["accuracy"]
    compared = json.loads((out / "calibration" / "comparisons.json").read_text())
    for label in ("dpo vs more", "dpo vs multitask"):
        assert set(sources) <= set(compared[label]) and "ci95" in compared[label]["helpful"]["ece_10"]
    table = (out / "calibration" / "table.md").read_text()
    assert "dpo" in table and "dpo vs more" in (out / "calibration" / "comparisons.md").read_text()
    judged = json.loads((out / "align" / "judgements.json").read_text())
    assert {"policy: dpo vs base", "best_of_n: dpo vs more", "best_of_n: more vs multitask"} <= set(judged)
    # the DPO policy against an RM-aligned policy (issue 30): judged once, with the prompt-paired gold difference
    head = judged["dpo/policy vs more/best_of_n"]["all"]
    assert head["n"] == head["gold_difference"]["n"] > 10 and {"low", "high", "p_value"} <= set(
        head["gold_difference"]
    )
    assert not [k for k in judged if k.endswith("dpo/policy vs more/best_of_n") and ":" in k]
    assert "| dpo/policy vs more/best_of_n | all |" in (out / "align" / "table.md").read_text()
    policies = json.loads((out / "align" / "metrics.json").read_text())["policies"]
    assert {"dpo/policy", "dpo/best_of_n", "more/best_of_n"} <= set(policies)
    assert policies["dpo/policy"]["perplexity"] != policies["base"]["perplexity"]  # the DPO policy itself
    assert not (out / "align" / "more" / "policy").exists()  # a classic RM has no policy of its own
    md = (out / "report.md").read_text()
    assert "dpo" in md and "dpo/policy" in md
    assert "| dpo | dpo: DPO (TRL's DPOTrainer, beta 0.1, sigmoid loss) from and against DIR/policy |" in md
    # a downstream rerun with the same settings is not refused (the dpo policy's own settings are compared, not
    # the classic RMs' reward.train); one with another reward.dpo.beta is, naming it
    again = _run(out, *DPO, "--stages", "calibration,report")
    assert again.returncode == 0, again.stderr[-4000:]
    other = _run(out, *DPO, "reward.dpo.beta=0.5", "--stages", "calibration,report")
    assert other.returncode == 2 and "reward.dpo.beta: 0.1 in RMs dpo vs 0.5 in the recipe" in other.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_tiny_cpu_under_accelerate_launch_two_processes(tmp_path):
    """The whole real pipeline under `accelerate launch` with 2 CPU processes (gloo)."""
    out = tmp_path / "run"
    env = subprocess_env(REPO, OMP_NUM_THREADS="1")
    args = ["-m", "pipeline.run", "--recipe", "tiny-cpu", "--output-dir", str(out), *SMALL]
    p = accelerate_launch_2proc(args, env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert all(e["status"] == "done" and e["world_size"] == 2 for e in m["stages"].values())
    assert "(2 processes)" in p.stderr
    assert "## Calibration" in (out / "report.md").read_text()


@pytest.mark.slow
def test_tiny_cpu_downstream_rerun_on_rms_of_other_settings(tmp_path):
    """Issue 28, item 1, as the user met it: RMs trained with learning_rate 5e-4 and normalize none, then
    calibration and the report rerun without those overrides. It rescored the same RMs and wrote 0.001 / l2 into
    recipe.yaml and report.md. Now it is refused (one line: both sides, the two ways on); with
    --allow-stale-upstream it goes on, the log and report.md warn beside the numbers, and report.md and
    recipe.yaml state the RMs' real 5e-4 / none."""
    import yaml

    out = tmp_path / "run"
    small = [*SMALL, "reward.methods=[more,multitask]"]
    trained = ["reward.train.learning_rate=5e-4", "reward.train.normalize=none"]
    p = pipeline_cli("tiny-cpu", out, *small, *trained, "--stages", "reward,calibration,report")
    assert p.returncode == 0, p.stderr[-4000:]
    before = (out / "calibration" / "metrics.json").read_bytes()

    later = [*small, "calibration.bootstrap_samples=30", "--stages", "calibration,report"]
    p = pipeline_cli("tiny-cpu", out, *later)
    assert p.returncode == 2, p.stderr[-4000:]
    err = p.stderr.strip().splitlines()[-1]
    assert (
        f"this recipe disagrees with the RMs in {out.resolve() / 'reward'} that calibration, report would use" in err
    )
    assert "reward.train.learning_rate: 0.0005 in RMs more, multitask vs 0.001 in the recipe" in err
    assert "reward.train.normalize: none in RMs more vs l2 in the recipe" in err
    assert (
        "repeat the settings they were produced with (reward.train.learning_rate=0.0005 reward.train.normalize=none)"
        in err
    )
    assert "rerun the reward stage with this recipe (--stages reward,calibration,report)" in err
    assert "--allow-stale-upstream" in err and "Traceback" not in p.stderr
    assert (out / "calibration" / "metrics.json").read_bytes() == before  # refused before any work

    p = pipeline_cli("tiny-cpu", out, *later, "--allow-stale-upstream")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "WARNING (--allow-stale-upstream): calibration runs on the RMs in reward/" in p.stderr
    md = (out / "report.md").read_text()
    trained_table = md.split("How each RM was trained", 1)[1]
    more = next(line for line in trained_table.splitlines() if line.startswith("| more |"))
    assert "normalize none" in more and "| 0.0005 (linear" in more
    assert "> **Warning** (--allow-stale-upstream): the recipe of the command that wrote this report" in md
    cal = md.split("## Calibration", 1)[1]
    assert cal.lstrip().startswith("> **Warning** (--allow-stale-upstream): the calibration stage ran on the RMs")
    assert "reward.train.learning_rate: 0.0005 in RMs more, multitask vs 0.001 in the recipe" in cal
    y = yaml.safe_load((out / "recipe.yaml").read_text())
    assert y["reward"]["train"]["learning_rate"] == 0.0005 and y["reward"]["train"]["normalize"] == "none"
    assert y["calibration"]["bootstrap_samples"] == 30
