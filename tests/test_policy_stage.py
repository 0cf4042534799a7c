"""The policy stage (issue 30): the base policy is built by a stage of its own, before the reward stage, into
DIR/policy/; the planner adds it whenever a stage that reads it is selected (align, and reward when it trains
dpo), only those stages follow its fingerprint, and the align stage reads the policy from DIR/policy/."""

from __future__ import annotations

import json

import pytest

import pipeline.run as R
from pipeline import stages
from pipeline.config import load_recipe, recipe_to_dict
from pipeline.plan import stage_config_hash, stage_inputs


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["align.warm_start_steps=4", "align.warm_start_prompts=8", "align.warm_start_batch_size=8"]


def _recipe(*overrides):
    return load_recipe("tiny-cpu", [*SMALL, *overrides])


def test_the_stage_table_puts_the_policy_stage_first_and_the_planner_adds_it_where_it_is_read():
    assert stages.stage_names()[0] == "policy"
    assert "policy" not in stages.section_classes()  # its settings are align keys: recipes are unchanged
    plain = recipe_to_dict(_recipe())
    dpo = recipe_to_dict(_recipe("reward.methods=[more,dpo]"))
    assert stages.needed(["reward", "calibration"], plain) == ["reward", "calibration"]
    assert stages.needed(["reward", "calibration"], dpo) == ["policy", "reward", "calibration"]
    assert stages.needed(["align"], plain) == ["policy", "align"]
    assert stages.upstream("reward", plain) == [] and stages.upstream("reward", dpo) == ["policy"]
    assert stages.upstream("align", plain) == ["policy", "reward", "calibration"]
    assert stages.upstream("report", plain) == ["reward", "calibration", "align"]


def test_only_the_stages_that_read_the_policy_follow_its_fingerprint():
    base, steps = _recipe(), _recipe("align.warm_start_steps=5")
    # the warm start reruns the policy and the align stage, not the reward stage (which does not read it) ...
    assert stage_config_hash(base, "policy") != stage_config_hash(steps, "policy")
    assert stage_config_hash(base, "align") != stage_config_hash(steps, "align")
    assert stage_config_hash(base, "reward") == stage_config_hash(steps, "reward")
    # ... unless the reward stage trains dpo from it
    dpo, dpo_steps = (
        _recipe("reward.methods=[more,dpo]"),
        _recipe("reward.methods=[more,dpo]", "align.warm_start_steps=5"),
    )
    assert stage_config_hash(dpo, "reward") != stage_config_hash(dpo_steps, "reward")
    # align keys that do not build the policy leave its fingerprint alone
    assert stage_config_hash(base, "policy") == stage_config_hash(_recipe("align.n=3"), "policy")
    # the manifest's inputs name the align keys that changed
    assert stage_inputs(recipe_to_dict(base), "policy")["align"]["warm_start_steps"] == 4


def test_dry_run_lists_the_policy_stage_where_it_is_needed(tmp_path, caplog):
    caplog.set_level("INFO", logger="pipeline.run")
    argv = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", *SMALL]
    assert R.main([*argv, "--stages", "align"]) == 0
    text = caplog.text
    assert "policy       RUN     never run in this directory" in text
    assert "4 warm-start steps (tiny policy, unless already built)" in text
    caplog.clear()
    assert R.main([*argv, "--stages", "calibration"]) == 0
    assert "policy       EXCLUDE not selected" in caplog.text
    caplog.clear()
    assert R.main([*argv, "--stages", "calibration", "reward.methods=[more,dpo]"]) == 0
    assert "policy       EXCLUDE not selected" in caplog.text  # calibration reads the policy, never builds it
    caplog.clear()
    assert R.main([*argv, "--stages", "reward", "reward.methods=[more,dpo]"]) == 0
    assert "policy       RUN     never run in this directory" in caplog.text


def test_the_policy_stage_writes_dir_policy_and_reuses_it(tmp_path, capsys):
    from pipeline.policy import stage as policy

    with pytest.raises(FileNotFoundError, match="run the policy stage first"):
        policy.read_policy(tmp_path)
    recipe = _recipe()
    assert policy.run(recipe, tmp_path) == ["policy"]
    info = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert info["model"] == "policy" and (tmp_path / "policy" / "model.safetensors").is_file()
    assert not (tmp_path / "policy" / ".warm_start_checkpoints").exists()
    path, tok, stamp = policy.read_policy(tmp_path)
    assert path == str(tmp_path / "policy") and stamp == info["stamp"] and tok.pad_token_id is not None
    assert policy.reference_of(tmp_path) == "policy"
    mtime = (tmp_path / "policy" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    policy.run(recipe, tmp_path)
    assert "reusing it" in capsys.readouterr().out
    assert (tmp_path / "policy" / "model.safetensors").stat().st_mtime_ns == mtime
    policy.run(recipe, tmp_path, force=True)  # --force policy rebuilds it
    assert "building the tiny base policy (warm start on synthetic responses of mixed quality): forced" in (
        capsys.readouterr().out
    )
    assert (tmp_path / "policy" / "model.safetensors").stat().st_mtime_ns != mtime
