"""MORERewardTrainer: loss equivalence with TRL, feature capture, training, saving, PEFT/QLoRA, bf16."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl import RewardConfig, RewardTrainer

from pipeline.checkpoints import (
    CHECKPOINT_COMPLETE,
    MORE_STATE,
    checkpoint_problem,
    last_complete_checkpoint,
    load_more_state,
)
from pipeline.layout import find_reward_head, pool_features
from pipeline.reward import more as more_mod
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer, SourceAwareCollator
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
    ours = MORERewardTrainer(
        H.model("gpt_neox", tok), H.config(tmp_path / "a", "uniform"), train_dataset=ds, processing_class=tok
    )
    batch = _batch(ours, 6)  # packed (the default for this decoder RM) ...
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    # ... and TRL's loss on the padded batch TRL's collator makes of the same pairs
    rows = [ours.train_dataset[i] for i in range(6)]
    batch = SourceAwareCollator(pad_token_id=tok.pad_token_id)(rows)
    trl_args = RewardConfig(
        output_dir=str(tmp_path / "b"), bf16=False, report_to="none", max_length=None, activation_checkpointing=False
    )
    trl = RewardTrainer(ours.model, trl_args, train_dataset=ds.remove_columns(["source_id"]), processing_class=tok)
    batch_trl = {k: v for k, v in batch.items() if k != "source_id"}
    loss_trl = trl.compute_loss(trl.model, batch_trl)
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-6, rtol=1e-6)
    # and MORE with equal weights forced is the same number
    more = MORERewardTrainer(ours.model, H.config(tmp_path / "c", "more"), train_dataset=ds, processing_class=tok)
    more._momentum = None
    loss_multi = MORERewardTrainer(
        ours.model, H.config(tmp_path / "d", "multitask"), train_dataset=ds, processing_class=tok
    ).compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(loss_multi, loss_trl, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_more_trains_and_moves_the_weights(tok, tmp_path, arch):
    model = H.model(arch, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MORERewardTrainer(
        model, H.config(tmp_path, "more", max_steps=8), train_dataset=H.balanced_pairs(8), processing_class=tok
    )
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
    trainer = MORERewardTrainer(
        H.model("gpt_neox", tok),
        H.config(tmp_path / "ck", "more", max_steps=2),
        train_dataset=H.balanced_pairs(2),
        processing_class=tok,
    )
    trainer.train()
    out = tmp_path / "rm"
    trainer.save_with_card(out)
    tok.save_pretrained(out)
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    rtok = AutoTokenizer.from_pretrained(out)
    assert rm.config.num_labels == 1
    trained = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    saved = rm.state_dict()
    assert set(saved) == set(trained)
    for k, v in saved.items():
        assert torch.equal(v, trained[k]), k  # the trained weights, bit for bit
    assert any(not torch.equal(v, H.model("gpt_neox", tok).state_dict()[k]) for k, v in saved.items())
    ids = rtok(["hello cat", "a red dog"], return_tensors="pt", padding=True)
    trainer.model.eval()
    torch.testing.assert_close(rm(**ids).logits, trainer.model(**ids).logits, rtol=0, atol=0)
    card = (out / "README.md").read_text()
    assert "more" in card and "helpful, harmless, webgpt" in card


def test_left_truncation_keeps_every_pair(tok, tmp_path):
    ds = H.balanced_pairs(4)
    trainer = MORERewardTrainer(
        H.model("gpt_neox", tok),
        H.config(tmp_path, "more", max_length=8, truncation="left"),
        train_dataset=ds,
        processing_class=tok,
    )
    assert len(trainer.train_dataset) == len(ds)  # TRL would have dropped the long ones
    assert trainer.n_truncated["train"] > 0
    row = trainer.train_dataset[0]
    assert len(row["chosen_ids"]) <= 8 and row["chosen_ids"][-1] == tok.eos_token_id


def test_more_needs_source_ids(tok, tmp_path):
    ds = H.balanced_pairs(2).remove_columns(["source_id"])
    trainer = MORERewardTrainer(
        H.model("gpt_neox", tok), H.config(tmp_path, "more"), train_dataset=ds, processing_class=tok
    )
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
    peft_config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"]
    )
    trainer = MORERewardTrainer(
        model,
        H.config(tmp_path / "ck", "more", max_steps=3),
        train_dataset=H.balanced_pairs(3),
        processing_class=tok,
        peft_config=peft_config,
    )
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
    from pipeline.reward.config import RewardStageConfig
    from pipeline.reward.stage import load_base_model

    base = tmp_path / "base"
    H.model("llama", tok).save_pretrained(base)
    cfg = RewardStageConfig(peft=f"qlora{bits}", lora_r=4, lora_alpha=8)
    model, peft_config = load_base_model(cfg, str(base))
    assert getattr(model, f"is_loaded_in_{bits}bit")
    trainer = MORERewardTrainer(
        model,
        H.config(tmp_path / "ck", "more", max_steps=2),
        train_dataset=H.balanced_pairs(2),
        processing_class=tok,
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in before) and any("score" in n for n in before)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    after = dict(trainer.model.named_parameters())
    changed = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert any("lora_B" in n for n in changed), "the LoRA adapter did not train"
    assert any("score" in n for n in changed), "the reward head did not train"


def test_bf16_training(tok, tmp_path):
    """bf16 autocast gives the fp32 run's numbers to bf16 precision (same losses and MORE weights)."""
    runs = {}
    for bf16 in (True, False):
        trainer = MORERewardTrainer(
            H.model("gpt_neox", tok),
            H.config(tmp_path / str(bf16), "more", max_steps=2, bf16=bf16, use_cpu=True),
            train_dataset=H.balanced_pairs(2),
            processing_class=tok,
        )
        seen = []
        head = find_reward_head(trainer.model)
        head.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        trainer.train()
        runs[bf16] = (trainer.state.log_history, seen)
    (bf, dtypes), (fp, _) = runs[True], runs[False]
    assert torch.bfloat16 in dtypes  # really ran in bf16
    assert len(_lambdas(bf)) == len(_lambdas(fp)) == 2
    np.testing.assert_allclose(_lambdas(bf), _lambdas(fp), atol=0.05)
    for lam in _lambdas(bf):
        assert min(lam) >= 0 and sum(lam) == pytest.approx(1.0, abs=1e-5)
    loss_bf = [h["loss"] for h in bf if "loss" in h and "more/lambda/helpful" in h]
    loss_fp = [h["loss"] for h in fp if "loss" in h and "more/lambda/helpful" in h]
    assert len(loss_bf) == len(loss_fp) == 2
    np.testing.assert_allclose(loss_bf, loss_fp, rtol=0.02)
    assert all(np.isfinite(loss_bf))


# ------------------------------------------------------------------ the loss is what the docs say it is
def _brute_force_min_norm(g: np.ndarray) -> np.ndarray:
    """argmin over the simplex of ||lambda^T g||^2 by SLSQP from many starts (independent of the trainer's
    active-set solver)."""
    from scipy.optimize import minimize

    k = g.shape[0]
    gram = g @ g.T
    best = None
    for start in [np.full(k, 1 / k), *np.eye(k)]:
        res = minimize(
            lambda x: x @ gram @ x,
            start,
            jac=lambda x: 2 * gram @ x,
            method="SLSQP",
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def test_more_loss_is_the_lambda_weighted_sum_of_per_source_bt_losses(tok, tmp_path, one_thread):
    """One MORE step, recomputed independently in float64: per-source BT losses from separate forward passes,
    head gradients by autograd, lambda by a generic QP solver. The logged lambda is non-uniform and is the
    min-norm point for this batch; the loss is sum_i lambda_i * BT_loss_i with exactly that lambda."""
    torch.manual_seed(0)
    model = H.model("gpt_neox", tok)
    with torch.no_grad():
        find_reward_head(model).weight.normal_(0, 2.0)  # distinct per-source gradients from the first step
    trainer = MORERewardTrainer(
        model, H.config(tmp_path, "more", alpha=1.0), train_dataset=H.balanced_pairs(4), processing_class=tok
    )
    batch = _batch(trainer, 6)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    lam = np.array([trainer._metrics["train"][f"more/lambda/{s}"][-1] for s in H.SOURCES])
    assert np.abs(lam - 1 / 3).max() > 0.02, lam  # the test must not pass with uniform weights

    model64 = H.model("gpt_neox", tok).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    head = find_reward_head(model64)
    rows = [trainer.train_dataset[i] for i in range(6)]
    bt, grads = [], []
    for sid in range(3):
        mine = [r for r in rows if r["source_id"] == sid]
        r_c = torch.cat([model64(input_ids=torch.tensor([r["chosen_ids"]])).logits[:, 0] for r in mine])
        r_r = torch.cat([model64(input_ids=torch.tensor([r["rejected_ids"]])).logits[:, 0] for r in mine])
        loss_i = -F.logsigmoid(r_c - r_r).mean()
        (g,) = torch.autograd.grad(loss_i, head.weight, retain_graph=True)
        bt.append(loss_i.item())
        grads.append(g.flatten().numpy() / np.linalg.norm(g.numpy()))  # normalize="l2"
    want_lam = _brute_force_min_norm(np.stack(grads))
    np.testing.assert_allclose(lam, want_lam, atol=2e-4)
    assert loss.item() == pytest.approx(float(lam @ np.array(bt)), rel=1e-5, abs=1e-6)


def test_more_momentum_follows_the_ema_convention(tok, tmp_path):
    """m_t = (1 - alpha) m_{t-1} + alpha g_t with alpha = 0.8 (alpha weighs the NEW gradient)."""
    trainer = MORERewardTrainer(
        H.model("gpt_neox", tok),
        H.config(tmp_path, "more", alpha=0.8),
        train_dataset=H.balanced_pairs(4),
        processing_class=tok,
    )
    grads = []
    orig = more_mod.head_gradient_sums

    def spy(*a, **kw):
        sums, counts = orig(*a, **kw)
        grads.append(sums / counts.clamp(min=1).unsqueeze(-1))
        return sums, counts

    import pipeline.reward.trainer as T

    T.head_gradient_sums, saved = spy, T.head_gradient_sums
    try:
        trainer.compute_loss(trainer.model, dict(_batch(trainer, 6)))
        rows = [trainer.train_dataset[i] for i in range(6, 12)]
        trainer.compute_loss(trainer.model, dict(trainer.data_collator(rows)))
    finally:
        T.head_gradient_sums = saved
    torch.testing.assert_close(trainer._momentum, 0.2 * grads[0] + 0.8 * grads[1])


def test_center_rewards_coefficient_uses_trls_formula(tok, tmp_path):
    """multitask with center_rewards_coefficient equals trl.RewardTrainer.compute_loss with the same setting."""
    ds = H.balanced_pairs(4)
    model = H.model("gpt_neox", tok)
    with torch.no_grad():
        find_reward_head(model).bias.fill_(3.0) if find_reward_head(model).bias is not None else None
        find_reward_head(model).weight.normal_(0, 1.0)
    ours = MORERewardTrainer(
        model,
        H.config(tmp_path / "a", "multitask", center_rewards_coefficient=0.5),
        train_dataset=ds,
        processing_class=tok,
    )
    loss_ours = ours.compute_loss(ours.model, dict(_batch(ours, 6)))  # packed (the default here) ...
    # ... and TRL's loss on the padded batch of the same pairs
    batch = SourceAwareCollator(pad_token_id=tok.pad_token_id)([ours.train_dataset[i] for i in range(6)])
    trl_args = RewardConfig(
        output_dir=str(tmp_path / "b"),
        bf16=False,
        report_to="none",
        max_length=None,
        activation_checkpointing=False,
        center_rewards_coefficient=0.5,
    )
    trl = RewardTrainer(model, trl_args, train_dataset=ds.remove_columns(["source_id"]), processing_class=tok)
    loss_trl = trl.compute_loss(trl.model, {k: v for k, v in batch.items() if k != "source_id"})
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-6, rtol=1e-6)
    plain = MORERewardTrainer(model, H.config(tmp_path / "c", "multitask"), train_dataset=ds, processing_class=tok)
    assert (loss_ours - plain.compute_loss(model, dict(batch))).abs() > 1e-3  # the term is really there


# ------------------------------------------------------------------ checkpoints: complete, atomic, with momentum
class _Interrupt(TrainerCallback):
    """Stop the run like a kill right after the checkpoint of `step` is saved."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed after a checkpoint")


def _lambdas(log_history):
    return [[h[f"more/lambda/{s}"] for s in H.SOURCES] for h in log_history if "more/lambda/helpful" in h]


def _more_ckpt_config(path, **kw):
    return H.config(path, "more", **{"max_steps": 6, "alpha": 0.3, "save_strategy": "steps", "save_steps": 3, **kw})


def test_more_resume_restores_momentum_and_matches_an_uninterrupted_run(tok, tmp_path, one_thread):
    ds = H.balanced_pairs(8)
    full = MORERewardTrainer(
        H.model("gpt_neox", tok), _more_ckpt_config(tmp_path / "full"), train_dataset=ds, processing_class=tok
    )
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / MORE_STATE).is_file() and (ckpt / CHECKPOINT_COMPLETE).is_file()
    assert not (ckpt / "more_state.pt").exists()  # safetensors, no pickle

    cut = MORERewardTrainer(
        H.model("gpt_neox", tok),
        _more_ckpt_config(tmp_path / "cut"),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[_Interrupt(3)],
    )
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    resumed = MORERewardTrainer(
        H.model("gpt_neox", tok, seed=7), _more_ckpt_config(tmp_path / "cut"), train_dataset=ds, processing_class=tok
    )
    resumed.train(resume_from_checkpoint=True)  # finds the last complete checkpoint itself
    want, got = _lambdas(full.state.log_history), _lambdas(resumed.state.log_history)
    assert len(want) == len(got) == 6
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)

    # Without the momentum the resumed trajectory differs (so the comparison above can fail) ...
    reset = MORERewardTrainer(
        H.model("gpt_neox", tok), _more_ckpt_config(tmp_path / "cut"), train_dataset=ds, processing_class=tok
    )
    (tmp_path / "cut" / "checkpoint-3" / MORE_STATE).unlink()
    # ... which is why a MORE checkpoint without it is refused instead of silently resetting MORE's state,
    with pytest.raises(ValueError, match="momentum"):
        reset.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    # and is not a complete checkpoint to resume from.
    assert checkpoint_problem(tmp_path / "cut" / "checkpoint-3", "more") is not None


def test_interrupted_checkpoint_save_is_not_resumed_from(tok, tmp_path, one_thread, monkeypatch):
    """Disk full while saving checkpoint-6 leaves it without trainer_state.json: resume uses checkpoint-3."""
    from transformers import Trainer

    ds = H.balanced_pairs(8)
    cfg = _more_ckpt_config(tmp_path / "ck", max_steps=9)
    trainer = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=ds, processing_class=tok)
    orig = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 6:
            raise OSError(28, "No space left on device")
        return orig(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.train()
    monkeypatch.undo()
    assert (tmp_path / "ck" / "checkpoint-6").is_dir()
    assert checkpoint_problem(tmp_path / "ck" / "checkpoint-6", "more") is not None
    assert last_complete_checkpoint(tmp_path / "ck", "more") == str(tmp_path / "ck" / "checkpoint-3")
    resumed = MORERewardTrainer(
        H.model("gpt_neox", tok),
        _more_ckpt_config(tmp_path / "ck", max_steps=9),
        train_dataset=ds,
        processing_class=tok,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 9


def test_legacy_momentum_pickle_is_loaded_weights_only(tmp_path):
    torch.save({"momentum": torch.ones(3, 2)}, tmp_path / "more_state.pt")
    assert torch.equal(load_more_state(tmp_path), torch.ones(3, 2))
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"momentum": torch.ones(1), "payload": _Interrupt(1)}, bad / "more_state.pt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        load_more_state(bad)  # an arbitrary pickled object is never executed


# ------------------------------------------------------------------ drop-in for trl.RewardTrainer (issue 16)
def _implicit(ds):
    """TRL's implicit-prompt text layout of project rows: chosen/rejected hold the whole text."""
    return Dataset.from_dict(
        {
            "chosen": [p + c for p, c in zip(ds["prompt"], ds["chosen"])],
            "rejected": [p + r for p, r in zip(ds["prompt"], ds["rejected"])],
        }
    )


def _conversational(ds, implicit: bool):
    rows = []
    for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"]):
        user = [{"role": "user", "content": p.split("Human:")[1].split("\n\nAssistant:")[0].strip()}]
        chosen, rejected = [{"role": "assistant", "content": c.strip()}], [{"role": "assistant", "content": r.strip()}]
        if implicit:
            rows.append({"chosen": user + chosen, "rejected": user + rejected, "chat_template_kwargs": {"x": 1}})
        else:
            rows.append({"prompt": user, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


def _trl_config(path, **kw):
    base = dict(output_dir=str(path), bf16=False, report_to="none", gradient_checkpointing=False, disable_tqdm=True)
    return RewardConfig(**{**base, **kw})


@pytest.mark.parametrize("layout", ["implicit_text", "explicit_conversational", "implicit_conversational"])
def test_trl_layouts_tokenize_like_trl(tok, chat_tok, tmp_path, layout):
    """Every TRL preference layout is accepted and tokenized to the ids trl.RewardTrainer itself makes."""
    from pipeline.models import TinyModelSpec, tiny_model

    base = H.balanced_pairs(2)
    if layout == "implicit_text":
        ds, t = _implicit(base), tok
    else:
        ds, t = _conversational(base, implicit=layout.startswith("implicit")), chat_tok
    model = tiny_model(TinyModelSpec(), t, task="reward")
    cfg = H.config(tmp_path / "a", "multitask", source_names=None, balanced_batches=False)
    ours = MORERewardTrainer(model, cfg, train_dataset=ds, processing_class=t)
    ref = RewardTrainer(model, _trl_config(tmp_path / "b", max_length=64), train_dataset=ds, processing_class=t)
    assert len(ours.train_dataset) == len(ref.train_dataset) == len(ds)
    assert ours.train_dataset["chosen_ids"] == ref.train_dataset["chosen_ids"]
    assert ours.train_dataset["rejected_ids"] == ref.train_dataset["rejected_ids"]
    if layout != "implicit_text":
        im_start = t.convert_tokens_to_ids("<|im_start|>")
        assert im_start in ours.train_dataset[0]["chosen_ids"]  # TRL applied the chat template


def test_args_none_trains_more_as_one_source_with_trls_loss(tok, tmp_path, monkeypatch):
    """args=None builds TRL's default ('<name>-Reward') MORERewardConfig: MORE on the data as ONE source
    (no source_id column, no source_names), whose loss is TRL's."""
    import functools

    monkeypatch.chdir(tmp_path)
    # TRL's default config asks for bf16, which a CPU-only machine refuses (stock TRL fails the same way here)
    cpu_init = functools.partialmethod(MORERewardConfig.__init__, bf16=False, use_cpu=True)
    monkeypatch.setattr(MORERewardConfig, "__init__", cpu_init)
    ds = _implicit(H.balanced_pairs(2))
    model = H.model("gpt_neox", tok)
    ours = MORERewardTrainer(model, train_dataset=ds, processing_class=tok)
    assert isinstance(ours.args, MORERewardConfig) and ours.args.output_dir.endswith("-Reward")
    assert ours.args.method == "more" and not ours.args.source_names and ours.packed
    batch = _batch(ours, 6)
    assert "source_id" not in batch
    ours.model.train()
    loss_ours = ours.compute_loss(ours.model, dict(batch))
    ref = RewardTrainer(model, _trl_config(tmp_path / "b"), train_dataset=ds, processing_class=tok)
    loss_ref = ref.compute_loss(ref.model, ref.data_collator([ref.train_dataset[i] for i in range(6)]))
    torch.testing.assert_close(loss_ours, loss_ref, atol=1e-5, rtol=1e-5)
    assert ours._last_lambda.tolist() == [1.0]
    assert "loss/all" in ours._metrics["train"] and "more/lambda/all" in ours._metrics["train"]


def test_more_single_source_weight_is_one_even_for_nan_gradients():
    """One source: the min-norm weight is 1 whatever its gradient (TRL trains on, e.g. an fp16 overflow)."""
    assert more_mod.min_norm_weights(torch.tensor([[float("nan"), 1.0]])).tolist() == [1.0]


def test_source_id_without_source_names_is_refused(tok, tmp_path):
    cfg = H.config(tmp_path, "more", source_names=None, balanced_batches=False)
    with pytest.raises(ValueError, match="source_names"):
        MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=H.balanced_pairs(2), processing_class=tok)
    # multitask needs no names: the source_id column is then ignored (one source, 'all')
    cfg = H.config(tmp_path, "multitask", source_names=None, balanced_batches=False)
    t = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=H.balanced_pairs(2), processing_class=tok)
    t.model.train()
    assert torch.isfinite(t.compute_loss(t.model, _batch(t, 6))) and "loss/all" in t._metrics["train"]


def test_step_count_and_last_batch_match_trl(tok, tmp_path, one_thread):
    """17 pairs, batch 8, 3 epochs: 9 optimizer steps, like TRL (the incomplete last batch is trained);
    every pair is read once per epoch."""
    ds = _implicit(H.balanced_pairs(6)).select(range(17))
    kw = dict(per_device_train_batch_size=8, num_train_epochs=3, max_steps=-1, learning_rate=1e-3)
    cfg = H.config(tmp_path / "a", "multitask", source_names=None, balanced_batches=False, **kw)
    ours = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=ds, processing_class=tok)
    sampler = ours._get_train_sampler()
    assert sorted(sampler) == list(range(17)) and len(ours.get_train_dataloader()) == 3
    ours.train()
    ref = RewardTrainer(
        H.model("gpt_neox", tok), _trl_config(tmp_path / "b", **kw), train_dataset=ds, processing_class=tok
    )
    assert ours.state.global_step == len(ref.get_train_dataloader()) * 3 == 9


def test_balanced_last_batch_keeps_every_pair(tok, tmp_path):
    """Balanced batches of 3 sources, 5 pairs each, batch 6: two full batches and one of 1 pair per source
    (TRL: ceil(15 / 6) = 3 batches too)."""
    ds = H.balanced_pairs(5, per_source=1)
    t = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path, "more"), train_dataset=ds, processing_class=tok)
    counts = [torch.bincount(b["source_id"], minlength=3).tolist() for b in t.get_train_dataloader()]
    assert counts == [[2, 2, 2], [2, 2, 2], [1, 1, 1]]


def test_legacy_pretokenized_columns_warn_and_honour_max_length(tok, tmp_path):
    """TRL's legacy chosen_input_ids/rejected_input_ids: renamed with TRL's FutureWarning; pre-tokenized
    pairs longer than max_length are dropped as TRL documents, and counted."""
    rng = np.random.default_rng(0)
    lengths = [(int(a), int(b)) for a, b in rng.integers(3, 20, size=(12, 2))]
    ids = lambda n: rng.integers(5, 100, size=n).tolist()  # noqa: E731
    ds = Dataset.from_dict(
        {"chosen_input_ids": [ids(a) for a, _ in lengths], "rejected_input_ids": [ids(b) for _, b in lengths]}
    )
    cfg = H.config(tmp_path, "multitask", source_names=None, balanced_batches=False, max_length=12)
    with pytest.warns(FutureWarning, match="chosen_input_ids"):
        t = MORERewardTrainer(H.model("gpt_neox", tok), cfg, train_dataset=ds, processing_class=tok)
    keep = [i for i, (a, b) in enumerate(lengths) if a <= 12 and b <= 12]
    assert 0 < len(keep) < 12 and t.n_dropped["train"] == 12 - len(keep)
    assert t.train_dataset["chosen_ids"] == [ds[i]["chosen_input_ids"] for i in keep]
    assert "chosen_input_ids" not in t.train_dataset.column_names


def test_streaming_datasets_train_and_evaluate(tok, tmp_path, caplog, one_thread):
    """Iterable train and eval sets: no len(); the sampler falls back to TRL's (logged), packing is on and
    logged once, and evaluation reads packed batches."""
    import logging

    ds = H.balanced_pairs(2)
    stream = ds.to_iterable_dataset()
    cfg = H.config(tmp_path, "more", balanced_batches=False, max_steps=2, eval_strategy="no")
    with caplog.at_level(logging.INFO, logger="pipeline.reward.trainer"):
        t = MORERewardTrainer(
            H.model("gpt_neox", tok), cfg, train_dataset=stream, eval_dataset={"a": stream}, processing_class=tok
        )
        t.train()
        metrics = t.evaluate()
    assert t.state.global_step == 2 and np.isfinite(metrics["eval_a_loss"])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("packing on" in m for m in messages) == 1
    assert any("length_grouping off" in m for m in messages)


def test_model_id_without_processing_class_packs_and_keeps_source_id(tok, tmp_path):
    """A model id and no processing_class: TRL loads the tokenizer, and the trainer still packs (where
    exact) and keeps source_id for MORE."""
    path = tmp_path / "rm"
    H.model("gpt_neox", tok).save_pretrained(path)
    tok.save_pretrained(path)
    t = MORERewardTrainer(str(path), H.config(tmp_path / "out", "more"), train_dataset=H.balanced_pairs(2))
    assert t.packed and t.packing_status == "on"
    batch = next(iter(t.get_train_dataloader()))
    assert batch["source_id"].tolist().count(0) == 2 and "readout" in batch
    t.model.train()
    assert torch.isfinite(t.compute_loss(t.model, batch))


def test_packing_off_says_why(tok, tmp_path):
    ds = H.balanced_pairs(2)
    t = MORERewardTrainer(
        H.model("gpt_neox", tok),
        H.config(tmp_path, "more"),
        train_dataset=ds,
        processing_class=tok,
        data_collator=SourceAwareCollator(pad_token_id=tok.pad_token_id),
    )
    assert not t.packed and t.packing_status == "off: a data_collator was passed"
    t = MORERewardTrainer(H.model("bert", tok), H.config(tmp_path, "more"), train_dataset=ds, processing_class=tok)
    assert not t.packed and "not a decoder" in t.packing_status


def test_bos_only_tokenizer_gets_trls_eos(tmp_path):
    """A tokenizer that adds a BOS and nothing after the text (Llama 3's layout): text pairs still end with
    the EOS TRL appends, so MORERewardTrainer's ids equal trl.RewardTrainer's."""
    from tokenizers.processors import TemplateProcessing

    t = H.tokenizer()
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{t.bos_token} $A", special_tokens=[(t.bos_token, t.bos_token_id)]
    )
    assert t("a cat")["input_ids"][0] == t.bos_token_id
    ds = _implicit(H.balanced_pairs(1))
    model = H.model("gpt_neox", t)
    cfg = H.config(tmp_path / "a", "multitask", source_names=None, balanced_batches=False)
    ours = MORERewardTrainer(model, cfg, train_dataset=ds, processing_class=t)
    ref = RewardTrainer(model, _trl_config(tmp_path / "b"), train_dataset=ds, processing_class=t)
    assert ours.train_dataset["chosen_ids"] == ref.train_dataset["chosen_ids"]
    assert all(ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id for ids in ours.train_dataset["chosen_ids"])


def test_a_new_reward_head_does_not_depend_on_what_ran_before(tok, tmp_path):
    """A base model without a reward head (a causal LM, like MiniLM's or Llama's hub weights) gets a freshly
    initialised head; with the recipe's seed it is the same whatever this process drew from the RNG before, so
    the second RM of a run equals the same RM trained alone."""
    from transformers import AutoModelForCausalLM

    from pipeline.reward.config import RewardStageConfig
    from pipeline.reward.stage import load_base_model

    base = tmp_path / "base"
    lm = H.model("llama", tok)
    AutoModelForCausalLM.from_config(lm.config).save_pretrained(base)
    cfg = RewardStageConfig()
    heads = []
    for draws in (0, 7):
        torch.rand(draws)  # another RM trained before, another amount of randomness used
        model, _ = load_base_model(cfg, str(base), seed=3)
        heads.append(find_reward_head(model).weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    torch.rand(7)
    other, _ = load_base_model(cfg, str(base), seed=4)
    assert not torch.equal(find_reward_head(other).weight, heads[0])
