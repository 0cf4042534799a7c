"""The reward stage end to end on the synthetic benchmark: RMs saved, index written, reruns skip."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.data import DataConfig
from pipeline.data.synthetic import SyntheticConfig
from pipeline.reward import stage
from pipeline.reward.stage import RewardStageConfig


def tiny_recipe(**reward):
    data = DataConfig(synthetic=SyntheticConfig(n_train=48, n_valid=16, n_test=16), n_train_per_source=16,
                      per_source_batch=2, max_length=96)
    rcfg = RewardStageConfig(**{"methods": ["more", "multitask"], "tokenizer_vocab_size": 400,
                                "train": {"max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1,
                                          "report_to": "none", "gradient_checkpointing": False,
                                          "disable_tqdm": True, "save_strategy": "no"}, **reward})
    return SimpleNamespace(name="test", seed=0, data=data, reward=rcfg)


def test_reward_stage_trains_saves_and_skips(tmp_path, capsys):
    recipe = tiny_recipe()
    artifacts = stage.run(recipe, tmp_path)
    index = json.loads((tmp_path / "reward" / "index.json").read_text())
    assert set(index) == {"more", "multitask"}
    assert index["more"]["sources"] == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    assert "reward/more" in artifacts
    for name in index:
        d = tmp_path / "reward" / name
        rm = AutoModelForSequenceClassification.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert rm(**tok(["\n\nHuman: hi\n\nAssistant: hello"], return_tensors="pt")).logits.shape == (1, 1)
        assert name in (d / "README.md").read_text()
    log = json.loads((tmp_path / "reward" / "more" / "train_log.json").read_text())
    assert any("more/lambda/webgpt" in h for h in log)
    assert not list((tmp_path / "reward").glob(".*.partial"))
    capsys.readouterr()
    stage.run(recipe, tmp_path)
    assert capsys.readouterr().out.count("already trained, skipping") == 2


def test_reward_stage_single_source_rms(tmp_path):
    recipe = tiny_recipe(methods=["single"])
    recipe.data.sources = recipe.data.sources[:2]
    stage.run(recipe, tmp_path)
    index = json.loads((tmp_path / "reward" / "index.json").read_text())
    assert set(index) == {"single-helpful", "single-harmless"}
    assert index["single-helpful"] == {"path": str(tmp_path / "reward" / "single-helpful"), "method": "single",
                                       "sources": ["helpful"]}


def test_reward_stage_config_errors():
    with pytest.raises(ValueError, match="methods"):
        RewardStageConfig(methods=["mgda"])
    with pytest.raises(ValueError, match="learning_rat"):
        RewardStageConfig(train={"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="peft"):
        RewardStageConfig(peft="qlora3")
