"""MORERewardTrainer: loss equivalence with TRL, feature capture, training, saving, PEFT/QLoRA, bf16."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from pipeline.reward.trainer import MORERewardTrainer, SourceAwareCollator, find_reward_head, pool_features
from tests import reward_helpers as H


@pytest.fixture(scope="module")
def tok():
    return H.tokenizer()


def _batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "bert"])
def test_pooled_features_reproduce_the_reward(tok, arch):
    model = H.model(arch, tok)
    feats = {}
    find_reward_head(model).register_forward_hook(lambda m, i, o: feats.update(z=i[0]))
    ids = tok(["hello there cat", "a dog", "red blue one two three"], padding=True, return_tensors="pt")
    out = model(**ids).logits[:, 0]
    z = pool_features(feats["z"], ids["input_ids"], model.config.pad_token_id)
    head = find_reward_head(model)
    recomputed = z @ head.weight[0] + (head.bias[0] if head.bias is not None else 0)
    torch.testing.assert_close(recomputed, out, atol=1e-5, rtol=1e-5)


def test_uniform_weights_reproduce_trl_loss(tok, tmp_path):
    ds = H.balanced_pairs(4)
    ours = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path / "a", "uniform"), train_dataset=ds,
                             processing_class=tok)
    batch = _batch(ours, 6)  # packed (the default for this decoder RM) ...
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    # ... and TRL's loss on the padded batch TRL's collator makes of the same pairs
    rows = [ours.train_dataset[i] for i in range(6)]
    batch = SourceAwareCollator(pad_token_id=tok.pad_token_id)(rows)
    trl_args = RewardConfig(output_dir=str(tmp_path / "b"), bf16=False, report_to="none", max_length=None,
                            gradient_checkpointing=False)
    trl = RewardTrainer(ours.model, trl_args, train_dataset=ds.remove_columns(["source_id"]), processing_class=tok)
    batch_trl = {k: v for k, v in batch.items() if k != "source_id"}
    loss_trl = trl.compute_loss(trl.model, batch_trl)
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-6, rtol=1e-6)
    # and MORE with equal weights forced is the same number
    more = MORERewardTrainer(ours.model, H.config(tmp_path / "c", "more"), train_dataset=ds, processing_class=tok)
    more._momentum = None
    loss_multi = MORERewardTrainer(ours.model, H.config(tmp_path / "d", "multitask"), train_dataset=ds,
                                   processing_class=tok).compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(loss_multi, loss_trl, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_more_trains_and_moves_the_weights(tok, tmp_path, arch):
    model = H.model(arch, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MORERewardTrainer(model, H.config(tmp_path, "more", max_steps=8), train_dataset=H.balanced_pairs(8),
                                processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "more/lambda/helpful" in h]
    assert len(logs) == 8
    for h in logs:
        lam = [h[f"more/lambda/{s}"] for s in H.SOURCES]
        assert min(lam) >= 0 and sum(lam) == pytest.approx(1.0, abs=1e-5)
        for s in H.SOURCES:
            assert f"loss/{s}" in h and f"accuracy/{s}" in h
    # MORE actually reweights: some step is far from uniform
    assert max(abs(h["more/lambda/helpful"] - 1 / 3) for h in logs) > 0.02
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_saved_rm_loads_with_auto_classes(tok, tmp_path):
    trainer = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path / "ck", "more", max_steps=2),
                                train_dataset=H.balanced_pairs(2), processing_class=tok)
    trainer.train()
    out = tmp_path / "rm"
    trainer.save_with_card(out)
    tok.save_pretrained(out)
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    rtok = AutoTokenizer.from_pretrained(out)
    assert rm.config.num_labels == 1
    r = rm(**rtok(["hello cat"], return_tensors="pt")).logits
    assert r.shape == (1, 1)
    card = (out / "README.md").read_text()
    assert "more" in card and "helpful, harmless, webgpt" in card


def test_left_truncation_keeps_every_pair(tok, tmp_path):
    ds = H.balanced_pairs(4)
    trainer = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path, "more", max_length=8),
                                train_dataset=ds, processing_class=tok)
    assert len(trainer.train_dataset) == len(ds)  # TRL would have dropped the long ones
    assert trainer.n_truncated["train"] > 0
    row = trainer.train_dataset[0]
    assert len(row["chosen_ids"]) <= 8 and row["chosen_ids"][-1] == tok.eos_token_id


def test_more_needs_source_ids(tok, tmp_path):
    ds = H.balanced_pairs(2).remove_columns(["source_id"])
    trainer = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path, "more"), train_dataset=ds,
                                processing_class=tok)
    with pytest.raises(ValueError, match="source_id"):
        trainer.compute_loss(trainer.model, _batch(trainer, 6))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="method"):
        H.config(tmp_path, "mgda")
    with pytest.raises(ValueError, match="normalize"):
        H.config(tmp_path, normalize="max")
    with pytest.raises(ValueError, match="source_names"):
        H.config(tmp_path, source_names=None)


def test_lora_trains_head_and_saves(tok, tmp_path):
    from peft import LoraConfig

    model = H.model("llama", tok)
    peft_config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                             modules_to_save=["score"])
    trainer = MORERewardTrainer(model, H.config(tmp_path / "ck", "more", max_steps=3), train_dataset=H.balanced_pairs(3),
                                processing_class=tok, peft_config=peft_config)
    head_before = find_reward_head(trainer.model).modules_to_save["default"].weight.detach().clone()
    trainer.train()
    head_after = find_reward_head(trainer.model).modules_to_save["default"].weight
    assert not torch.equal(head_before, head_after)
    trainer.save_with_card(tmp_path / "rm")
    assert (tmp_path / "rm" / "adapter_config.json").exists()
    cfg = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert "score" in cfg["modules_to_save"]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_on_cpu(tok, tmp_path, bits):
    """4-bit/8-bit bitsandbytes base + LoRA, through the reward stage's loader, trains on CPU."""
    from pipeline.reward.stage import RewardStageConfig, load_base_model

    base = tmp_path / "base"
    H.model("llama", tok).save_pretrained(base)
    cfg = RewardStageConfig(peft=f"qlora{bits}", lora_r=4, lora_alpha=8)
    model, peft_config = load_base_model(cfg, str(base))
    assert getattr(model, f"is_loaded_in_{bits}bit")
    trainer = MORERewardTrainer(model, H.config(tmp_path / "ck", "more", max_steps=2), train_dataset=H.balanced_pairs(2),
                                processing_class=tok, peft_config=peft_config)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_bf16_training(tok, tmp_path):
    trainer = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path, "more", max_steps=2, bf16=True, use_cpu=True),
                                train_dataset=H.balanced_pairs(2), processing_class=tok)
    trainer.train()
    assert any("more/lambda/helpful" in h for h in trainer.state.log_history)
