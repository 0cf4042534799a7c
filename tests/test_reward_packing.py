"""Packed reward-model training (pipeline.reward.packing): exactness against padded batches, bin packing and the
length-grouped balanced sampler."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from pipeline.reward.packing import LengthGroupedBalancedSampler, PackedPairCollator, first_fit_decreasing
from pipeline.reward.trainer import MORERewardTrainer
from tests import reward_helpers as H


@pytest.fixture(scope="module")
def tok():
    return H.tokenizer()


def test_first_fit_decreasing_hand_case():
    rows = first_fit_decreasing([5, 3, 7, 2, 9, 12], budget=10)
    assert rows == [[5], [4], [2, 1], [0, 3]]  # 12 alone (over budget), 9, 7+3, 5+2
    assert sorted(i for r in rows for i in r) == list(range(6))


def _edge_pairs(tok):
    """Pairs tokenized as the trainer does, plus hand-made edge cases: no shared prefix, chosen a prefix of
    rejected, identical sides, and sides ending in pad tokens (pooled before them, transformers' rule)."""
    ds = H.balanced_pairs(2, per_source=2, seed=5)
    rows = []
    pad, eos = tok.pad_token_id, tok.eos_token_id
    for i, e in enumerate(ds):
        c = tok(e["prompt"] + e["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        r = tok(e["prompt"] + e["rejected"], add_special_tokens=False)["input_ids"] + [eos]
        rows.append({"chosen_ids": c, "rejected_ids": r, "source_id": e["source_id"], "margin": 0.1 * (i % 3)})
    extra = [
        ([7, 8, 9, 10], [11, 12, 13]),
        ([20, 21, 22, 23], [20, 21, 22, 23, 24, 25]),
        ([30, 31, 32, 33, 34], [30, 31, 32, 33, 34]),
        ([40, 41, 42, 43, pad, pad], [40, 41, 44, pad]),
    ]
    for j, (c, r) in enumerate(extra):
        rows[j].update(chosen_ids=c, rejected_ids=r)
    return Dataset.from_list(rows)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "arch,method,lora",
    [
        ("gpt_neox", "more", False),
        ("llama", "more", False),
        ("gpt_neox", "multitask", False),
        ("llama", "uniform", False),
        ("llama", "more", True),
        ("gpt_neox", "more", True),
        ("llama:eager", "more", False),
    ],
)
def test_packed_training_equals_padded(tok, tmp_path, arch, method, lora):
    """fp32: the packed batch gives the padded batch's rewards, loss, MORE head-gradient statistics (lambda and
    momentum) and every parameter gradient to 1e-5, with several pairs per row and a row budget that splits them.
    `arch:eager`: eager attention, which adds the 4D mask to the scores (the packed mask must be additive)."""
    arch, _, attn = arch.partition(":")
    ds = _edge_pairs(tok)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"]
        )
    base = H.model(arch, tok, seed=1)
    if attn:
        base.set_attn_implementation(attn)
    trainers = {}
    for packing in (True, False):
        cfg = H.config(
            tmp_path / str(packing),
            method,
            packing=packing,
            packing_max_tokens=48,
            per_device_train_batch_size=len(ds),
        )
        trainers[packing] = MORERewardTrainer(
            copy.deepcopy(base), cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config
        )
    assert trainers[True].packed and not trainers[False].packed
    out = {}
    for packing, t in trainers.items():
        batch = t.data_collator([t.train_dataset[i] for i in range(len(ds))])
        if packing:
            assert batch["attention_mask"].ndim == 4 and batch["input_ids"].shape[0] < len(ds)  # several per row
            longest = max(map(len, list(ds["chosen_ids"]) + list(ds["rejected_ids"])))
            assert batch["input_ids"].numel() < 2 * len(ds) * longest
        t.model.train()
        for _ in range(2):  # the second step exercises MORE's momentum
            t.model.zero_grad()
            loss, outputs = t.compute_loss(t.model, dict(batch), return_outputs=True)
            loss.backward()
        out[packing] = (loss.detach(), outputs.logits.detach(), _grads(t.model), t._last_lambda, t._momentum)
    (lp, rp, gp, lamp, mp), (lu, ru, gu, lamu, mu) = out[True], out[False]
    torch.testing.assert_close(lp, lu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rp.reshape(-1), ru.reshape(-1), atol=1e-5, rtol=1e-5)
    assert gp.keys() == gu.keys() and len(gp) > 0
    for name in gp:
        torch.testing.assert_close(gp[name], gu[name], atol=1e-5, rtol=1e-4, msg=name)
    if method == "more":
        torch.testing.assert_close(lamp, lamu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mp, mu, atol=1e-5, rtol=1e-5)


def test_bert_falls_back_to_padded_batches(tok, tmp_path):
    t = MORERewardTrainer(
        H.model("bert", tok), H.config(tmp_path, "more"), train_dataset=H.balanced_pairs(2), processing_class=tok
    )
    assert not t.packed and not isinstance(t.data_collator, PackedPairCollator)


def test_packed_more_trains_end_to_end(tok, tmp_path):
    model = H.model("gpt_neox", tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = MORERewardTrainer(
        model, H.config(tmp_path, "more", max_steps=4), train_dataset=H.balanced_pairs(8), processing_class=tok
    )
    assert t.packed
    t.train()
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters())
    logs = [r for r in t.state.log_history if "loss" in r]
    assert logs and all(np.isfinite(r["loss"]) for r in logs) and logs[-1]["num_tokens"] > 0


def test_length_grouped_balanced_sampler():
    rng = np.random.default_rng(0)
    k, psb, n = 3, 4, 400
    sources = np.repeat(np.arange(k), n)
    lengths = rng.integers(10, 500, size=k * n)
    s = LengthGroupedBalancedSampler(lengths, sources, psb, seed=7, mega_batches=10)
    s.set_epoch(0)
    batches = s.batches()
    assert len(batches) == n // psb and len(list(iter(s))) == len(s) == k * n
    seen = []
    for b in batches:
        assert len(b) == k * psb
        assert np.bincount(sources[b], minlength=k).tolist() == [psb] * k  # balanced
        seen += b
    assert sorted(seen) == list(range(k * n))  # every pair once per epoch
    # grouped: batches span much less length than random balanced batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    rand = np.mean(
        [
            np.ptp(lengths[np.concatenate([rng.choice(np.flatnonzero(sources == j), psb) for j in range(k)])])
            for _ in range(100)
        ]
    )
    assert spread < 0.5 * rand
    # deterministic per (seed, epoch); reshuffled across epochs and seeds
    assert s.batches() == batches
    s.set_epoch(1)
    assert s.batches() != batches
    assert LengthGroupedBalancedSampler(lengths, sources, psb, seed=8, mega_batches=10).batches() != batches


def test_sampler_without_sources_and_uneven_sources():
    lengths = list(range(30))
    s = LengthGroupedBalancedSampler(lengths, None, 5, seed=0)
    assert sorted(i for b in s.batches() for i in b) == list(range(30))
    s = LengthGroupedBalancedSampler(lengths, [0] * 20 + [1] * 10, 5, seed=0)
    assert len(s.batches()) == 2 and all(sum(i >= 20 for i in b) == 5 for b in s.batches())
    # a source smaller than one balanced share: one incomplete batch, as balanced as it allows; the rest of
    # the larger source is left out this epoch, and counted
    s = LengthGroupedBalancedSampler(lengths, [0] * 28 + [1] * 2, 5)
    assert [sorted(i >= 28 for i in b) for b in s.batches()] == [[False, False, True, True]]
    assert (len(s), s.n_left_out) == (4, 26)


def test_trainer_uses_the_grouped_balanced_sampler(tok, tmp_path):
    ds = H.balanced_pairs(6)
    t = MORERewardTrainer(H.model("gpt_neox", tok), H.config(tmp_path, "more"), train_dataset=ds, processing_class=tok)
    loader = t.get_train_dataloader()
    for batch in loader:
        counts = torch.bincount(batch["source_id"], minlength=3).tolist()
        assert counts == [2, 2, 2]
