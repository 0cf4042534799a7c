"""Did the RM learn anything? The calibration stage scores each trained RM's own starting point (step 0: its base
with the reward head initialised as its training began, same seed) on the same pairs, compares the two, and the
report says when a trained RM is not significantly more accurate than its step 0."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

import pipeline.config as C
import pipeline.report.stage as report
from pipeline.calibration import stage as calibration
from pipeline.calibration.config import CalibrationConfig
from pipeline.calibration.step0 import load_start, plan_starts
from pipeline.models import TinyModelSpec, tiny_model
from pipeline.reward import stage as reward
from pipeline.reward.index import read_index
from tests.helpers import fake_calibration_dir, reward_recipe


def _causal_base(path, tok):
    """A base WITHOUT a reward head (a causal LM, as a hub model would be): the head is initialised when the RM
    is loaded, from the seed, so only the same seed gives the same step 0."""
    tiny_model(TinyModelSpec(arch="gpt_neox", size="tiny"), tok, task="causal_lm", seed=5).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _recipe(base: str, lr: float, **cal):
    recipe = reward_recipe(model_name_or_path=base)
    recipe.reward.train["learning_rate"] = lr
    recipe.calibration = CalibrationConfig(
        **{"dtype": "fp32", "bootstrap_samples": 50, "batch_size": 16, "progress": False, "plots": False, **cal}
    )
    return recipe


def test_an_rm_that_never_moved_scores_exactly_as_its_step0(tmp_path, tiny_tok, capsys):
    """learning_rate 0: the trained RM IS its starting point, so if step 0 is rebuilt as the training began (same
    base, same seed for the new head, same pad id), every reward and every compared metric is equal."""
    base = _causal_base(tmp_path / "base", tiny_tok)
    recipe = _recipe(base, 0.0)
    d = tmp_path / "run"
    reward.run(recipe, d)
    capsys.readouterr()
    calibration.run(recipe, d)
    out = capsys.readouterr().out
    assert "[calibration] step 0 of more, multitask: scoring its untrained starting point" in out
    cal = d / "calibration"
    comps = json.loads((cal / "comparisons.json").read_text())
    for rm in ("more", "multitask"):
        entry = comps[f"{rm} vs {rm}@step0"]
        for group, by_metric in entry.items():
            for metric, e in by_metric.items():
                assert e["diff"] == 0.0, (rm, group, metric, e)
    info = json.loads((cal / "step0.json").read_text())
    ref = info["references"]["step0"]
    assert ref["rms"] == ["more", "multitask"] and ref["seed"] == 0 and ref["base"] == base
    assert info["scoring_seconds"] > 0 and info["no_reference"] == {}
    # step 0's accuracy is in step0.json, and metrics.json keeps only the evaluated RMs
    acc = json.loads((cal / "metrics.json").read_text())["more"]["all_average"]["accuracy"]
    assert ref["metrics"]["all_average"]["accuracy"] == acc
    assert set(json.loads((cal / "metrics.json").read_text())) == {"more", "multitask"}
    md = (cal / "comparisons.md").read_text()
    assert "## Each trained RM vs its untrained starting point (step 0)" in md and "### more vs more@step0" in md
    # the report: neither RM learned anything (they are their starting point)
    report.run(recipe_for_report(recipe), d)
    text = (d / "report.md").read_text()
    assert "**Did the RMs learn anything?**" in text
    assert "- **more is not significantly more accurate than its untrained starting point**: accuracy" in text
    assert "- **multitask is not significantly more accurate than its untrained starting point**" in text
    assert "more vs more@step0" not in text.split("**Did the RMs learn anything?**")[0]  # not among RM-vs-RM lines


def recipe_for_report(recipe):
    r = C.load_recipe("tiny-cpu")
    r.data, r.reward = recipe.data, recipe.reward
    return r


def test_step0_uses_the_seed_the_rm_was_trained_with(tmp_path, tiny_tok):
    """A trained RM's step 0 comes from its own fingerprint (seed, base), not from the recipe calibration runs
    with; a base replaced since the RM was trained gives no reference, and the log and step0.json say why."""
    base = _causal_base(tmp_path / "base", tiny_tok)
    recipe = _recipe(base, 1e-3)
    d = tmp_path / "run"
    reward.run(recipe, d)
    index = read_index(d, None, key="calibration.rms")
    starts, skipped = plan_starts(index, {}, d, recipe.calibration)
    assert not skipped and [s.seed for s in starts.values()] == [0]
    recipe.seed = 7  # calibration under another seed: the RMs were still trained with seed 0
    calibration.run(recipe, d)
    comps = json.loads((d / "calibration" / "comparisons.json").read_text())
    assert comps["more vs more@step0"]["all_average"]["accuracy"]["ci95"] is not None
    # trained with a learning rate: the rewards moved away from step 0
    assert any(e["diff"] != 0 for e in comps["more vs more@step0"]["helpful"].values())
    # the base is replaced: no reference, and why
    tiny_model(TinyModelSpec(arch="gpt_neox", size="tiny"), tiny_tok, task="causal_lm", seed=6).save_pretrained(base)
    starts, skipped = plan_starts(index, {}, d, recipe.calibration)
    assert not starts and skipped["more"] == f"its base model {base} changed since it was trained"
    calibration.run(recipe, d)
    info = json.loads((d / "calibration" / "step0.json").read_text())
    assert info["references"] == {} and "changed since it was trained" in info["no_reference"]["multitask"]
    assert not any("@step0" in k for k in json.loads((d / "calibration" / "comparisons.json").read_text()))


class _FirstStep(TrainerCallback):
    """Records the model the Trainer is about to take its first step with (a LoRA model merged: what the RM would
    be, saved and loaded as calibration loads it, at step 0), and whether every LoRA B is zero."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        rec = self.store[self.name] = {}
        if hasattr(model, "merge_and_unload"):
            rec["lora_B"] = [bool(torch.all(p == 0)) for n, p in model.named_parameters() if "lora_B" in n]
            model = copy.deepcopy(model).merge_and_unload()
        rec["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rec["pad_token_id"] = model.config.pad_token_id


@pytest.mark.parametrize("base_kind, peft", [("tiny", "none"), ("causal", "none"), ("causal", "lora")])
def test_step0_is_the_model_the_trainer_took_its_first_step_with(tmp_path, tiny_tok, monkeypatch, base_kind, peft):
    """The proof: the step-0 model calibration scores has, parameter for parameter, the weights the Trainer held
    before its first optimizer step (the tiny base's saved head; a hub-like base's head drawn from the seed; a LoRA
    RM's base and head, its B matrices all zero), and the pad id the trainer set."""
    seen: dict = {}
    attach = reward.attach_progress

    def attach_and_record(trainer, label):
        attach(trainer, label)
        trainer.add_callback(_FirstStep(label.removeprefix("reward ").split(",")[0], seen))

    monkeypatch.setattr(reward, "attach_progress", attach_and_record)
    base = _causal_base(tmp_path / "base", tiny_tok) if base_kind == "causal" else None
    recipe = _recipe(base, 1e-3)
    recipe.reward.methods, recipe.reward.peft, recipe.reward.lora_r = ["more", "multitask"], peft, 4
    recipe.reward.train["max_steps"] = 1
    d = tmp_path / "run"
    reward.run(recipe, d)
    starts, skipped = plan_starts(read_index(d, None, key="calibration.rms"), {}, d, recipe.calibration)
    assert not skipped and len(starts) == 1
    start = next(iter(starts.values()))
    assert start.rms == ["more", "multitask"] and start.load["peft"] == peft
    model, _ = load_start(start, recipe.calibration, "cpu")
    mine = model.state_dict()
    for rm in ("more", "multitask"):
        first = seen[rm]
        assert first.get("lora_B", [True]) and all(first.get("lora_B", [True])), first.get("lora_B")
        assert set(mine) == set(first["params"])
        different = [k for k, v in first["params"].items() if not torch.equal(v, mine[k])]
        assert not different, (rm, different)
        assert model.config.pad_token_id == first["pad_token_id"]
    if base_kind == "causal":  # the head is drawn from the seed: another seed draws another one
        other, _ = reward.load_base_model(recipe.reward, base, seed=start.seed + 1)
        assert not torch.equal(other.score.weight, mine["score.weight"])


def test_no_step0_for_external_rms_or_under_calibration_bits(tmp_path):
    """An external RM has no known starting point; calibration.bits loads the RMs quantized: both say so."""
    cfg = CalibrationConfig(bits=4)
    starts, skipped = plan_starts({"more": {"path": str(tmp_path)}}, {"ext": {"path": "x"}}, tmp_path, cfg)
    assert not starts
    assert skipped["ext"] == "an external RM (calibration.external_rms): where its training began is not known"
    assert skipped["more"].startswith("calibration.bits loads the RMs quantized")


def test_step0_reference_can_be_turned_off(tmp_path, tiny_tok):
    recipe = _recipe(_causal_base(tmp_path / "base", tiny_tok), 1e-3, step0_reference=False)
    d = tmp_path / "run"
    reward.run(recipe, d)
    calibration.run(recipe, d)
    assert not (d / "calibration" / "step0.json").exists()
    assert not any("@step0" in k for k in json.loads((d / "calibration" / "comparisons.json").read_text()))


def _entry(a, b, lo, hi, p):
    return {"a": a, "b": b, "diff": a - b, "ci95": [lo, hi], "p_value": p}


def test_report_line_for_an_rm_that_learned_and_one_that_did_not(tmp_path):
    recipe = C.load_recipe("tiny-cpu")
    d = fake_calibration_dir(tmp_path)
    comps = {
        "more vs multitask": {"all_average": {"accuracy": _entry(0.6, 0.6, -0.01, 0.01, 0.9)}},
        "more vs more@step0": {"all_average": {"accuracy": _entry(0.6295, 0.5012, 0.101, 0.152, 0.0)}},
        "multitask vs multitask@step0": {"all_average": {"accuracy": _entry(0.597, 0.587, -0.02, 0.04, 0.5)}},
    }
    (d / "calibration" / "comparisons.json").write_text(json.dumps(comps))
    (d / "calibration" / "step0.json").write_text(json.dumps({"no_reference": {"uniform": "no fingerprint.json"}}))
    text, data = report.render_report(recipe, d)
    assert (
        "- more: accuracy 62.95% vs 50.12% at step 0, higher by 12.83 points (95% CI +10.10 to +15.20; p < 0.010)"
        in text
    )
    assert (
        "- **multitask is not significantly more accurate than its untrained starting point**: accuracy 59.70% vs "
        "58.70% at step 0 (difference +1.00 points, 95% CI -2.00 to +4.00; p = 0.500 (in steps of 0.010: 200 "
        "resamples))."
    ) in text
    assert "- uniform: no step-0 reference (no fingerprint.json)." in text
    assert data["calibration"]["step0"] == {"more": True, "multitask": False, "uniform": None}
    assert not any("step0" in s for s in data["sentences"])
    assert np.isclose(comps["more vs more@step0"]["all_average"]["accuracy"]["diff"], 0.1283)


def test_report_with_only_step0_comparisons_states_the_rule_and_names_external_rms(tmp_path):
    """One trained RM (no RM-vs-RM comparison) and an external one: the step-0 lines state the significance rule
    themselves, and the external RM is named as having no known starting point."""
    recipe = C.load_recipe("tiny-cpu")
    d = fake_calibration_dir(tmp_path, ("multitask", "ext"))
    comps = {"multitask vs multitask@step0": {"all_average": {"accuracy": _entry(0.6, 0.59, -0.03, 0.05, 0.6)}}}
    (d / "calibration" / "comparisons.json").write_text(json.dumps(comps))
    why = "an external RM (calibration.external_rms): where its training began is not known"
    (d / "calibration" / "step0.json").write_text(json.dumps({"no_reference": {"ext": why}}))
    report.run(recipe, d)
    text = (d / "report.md").read_text()
    assert (
        "What this run measured (no paired comparisons between RMs were computed, so no differences between " in text
    )
    assert "significantly higher (its 95% interval excludes 0 AND p < 0.05" in text
    assert "- **multitask is not significantly more accurate than its untrained starting point**" in text
    assert f"- ext: no step-0 reference ({why})." in text


def test_the_averaging_rms_step0_is_the_average_of_its_members_step0s():
    """The Averaging RM (the mean reward of the single-source RMs) is compared with the same mean over its
    members' step 0s; when a member has none, it has none either, and says which member."""
    from types import SimpleNamespace

    from pipeline.calibration.step0 import Start, averaging_reason, rewards_by_rm

    start = Start(base="b", seed=0, load={}, tokenizer=None, rm_dir="d", rms=["single-a", "single-b"])
    arr = {"a": {"test": (np.array([1.0, 2.0]), np.array([0.5, 0.5]))}}
    ev = SimpleNamespace(starts={"k": start}, singles=["single-a", "single-b"], with_averaging=True)
    by_rm = rewards_by_rm(ev, {"k": arr})
    assert set(by_rm) == {"single-a", "single-b", "averaging"} and averaging_reason(ev) is None
    np.testing.assert_array_equal(by_rm["averaging"]["a"]["test"][0], [1.0, 2.0])
    start.rms = ["single-a"]
    assert "averaging" not in rewards_by_rm(ev, {"k": arr})
    assert averaging_reason(ev) == "its member(s) single-b have none"
