"""The tiny warm-started policy: response-only labels, and samples that look like (mixed-quality) answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.align.policy import sample_responses
from pipeline.policy.warm_start import (
    IGNORE_INDEX,
    collate_right,
    response_mask_labels,
    response_nll,
    warm_start_policy,
)


def test_response_mask_labels_appends_eos_and_masks_prompt():
    ids, labels = response_mask_labels([10, 11, 12], [20, 21], eos_id=1, max_length=16)
    assert ids == [10, 11, 12, 20, 21, 1]
    assert labels == [IGNORE_INDEX] * 3 + [20, 21, 1]
    # EOS not doubled
    ids, labels = response_mask_labels([10], [20, 1], eos_id=1, max_length=16)
    assert ids == [10, 20, 1] and labels == [IGNORE_INDEX, 20, 1]


def test_response_mask_labels_truncates_prompt_from_left_then_response_end():
    ids, labels = response_mask_labels([10, 11, 12, 13], [20, 21], eos_id=1, max_length=5)
    assert ids == [12, 13, 20, 21, 1] and labels == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 1]
    ids, labels = response_mask_labels([10, 11], [20, 21, 22, 23, 24], eos_id=1, max_length=4)
    assert ids == [11, 20, 21, 22] and labels == [IGNORE_INDEX, 20, 21, 22]


def test_collate_and_response_nll_only_counts_response_tokens():
    batch = collate_right([([3, 4, 5], [IGNORE_INDEX, 4, 5]), ([3, 6], [IGNORE_INDEX, 6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [3, 6, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 4, 5], [IGNORE_INDEX, 6, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, -1)
    # predicted tokens: row0 pos0->4, pos1->5; row1 pos0->6
    expect = -(logp[0, 0, 4] + logp[0, 1, 5] + logp[1, 0, 6]) / 3
    assert response_nll(logits, batch["labels"]).item() == pytest.approx(expect.item(), abs=1e-6)


def test_warm_start_rejects_bad_input(tiny_tok):
    with pytest.raises(ValueError, match="parallel lists"):
        warm_start_policy(tiny_tok, ["a"], [], steps=1)
    with pytest.raises(ValueError, match="no \\(prompt, response\\) pairs"):
        warm_start_policy(tiny_tok, [], [], steps=1)


def test_warm_start_gives_template_like_mixed_quality_answers(tiny_tok, one_thread):
    from pipeline.data.synthetic import gold_reward, response_attributes, synthetic_prompts, synthetic_responses
    from pipeline.models import TinyModelSpec, tiny_model

    train = synthetic_prompts(200, seed=1, split="train")
    prompts = [p for p in train for _ in range(4)]
    responses = [r for p in train for r in synthetic_responses(p, 4, seed=1)]
    policy = warm_start_policy(tiny_tok, prompts, responses, seed=0)
    assert sum(p.numel() for p in policy.parameters()) < 1_000_000

    test = synthetic_prompts(64, seed=2, split="test")
    random_policy = tiny_model(TinyModelSpec(arch="gpt_neox"), tiny_tok, task="causal_lm", seed=0)
    stats = {}
    for name, model in (("warm", policy), ("random", random_policy)):
        texts, has_eos = sample_responses(model, tiny_tok, test, max_new_tokens=48, seed=0)
        gold = np.array([gold_reward(p, r) for p, r in zip(test, texts)])
        attrs = [response_attributes(p, r) for p, r in zip(test, texts)]
        clean = np.mean([a["junk_words"] == 0 for a in attrs])  # the text parses as template words only
        stats[name] = dict(gold=gold, eos=np.mean(has_eos), clean=clean)
    warm, rand = stats["warm"], stats["random"]
    assert warm["clean"] > rand["clean"] + 0.3, stats
    assert warm["gold"].mean() > rand["gold"].mean() + 1.0, stats
    assert warm["eos"] >= 0.5, stats
    # mixed quality: some samples get the top gold reward, and some clearly do not (room for alignment)
    assert (warm["gold"] == 2.0).mean() >= 0.05, stats
    assert (warm["gold"] <= -1.0).mean() >= 0.2, stats


def test_warm_start_interrupted_resumes_from_its_last_complete_checkpoint(tiny_tok, tmp_path, one_thread):
    from pipeline.checkpoints import CHECKPOINT_COMPLETE
    from pipeline.data.synthetic import synthetic_prompts, synthetic_responses
    from pipeline.models import TinyModelSpec, tiny_model

    train = synthetic_prompts(16, seed=1, split="train")
    prompts = [p for p in train for _ in range(2)]
    responses = [r for p in train for r in synthetic_responses(p, 2, seed=1)]
    kw = dict(steps=10, batch_size=4, seed=0, lr=1e-2)

    def fresh():
        return tiny_model(TinyModelSpec(arch="gpt_neox"), tiny_tok, task="causal_lm", seed=0)

    reference = warm_start_policy(tiny_tok, prompts, responses, model=fresh(), **kw)

    class Interrupt(Exception):
        pass

    calls = []

    def dying(model):  # Ctrl-C during step 8 (0-based 7): checkpoints 3 and 6 exist by then
        forward = model.forward

        def dying_forward(*a, **k):
            calls.append(1)
            if len(calls) == 8:
                raise Interrupt
            return forward(*a, **k)

        model.forward = dying_forward
        return model

    model = dying(fresh())
    ckpts = tmp_path / "ckpts"
    with pytest.raises(Interrupt):
        warm_start_policy(tiny_tok, prompts, responses, model=model, checkpoint_dir=ckpts, save_every=3, **kw)
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-6"]  # older ones rotated away
    (ckpts / "checkpoint-9").mkdir()  # a save interrupted before its completion marker: not resumed from
    assert not (ckpts / "checkpoint-9" / CHECKPOINT_COMPLETE).exists()
    calls.clear()
    model = dying(fresh())
    resumed = warm_start_policy(tiny_tok, prompts, responses, model=model, checkpoint_dir=ckpts, save_every=3, **kw)
    assert len(calls) == 4  # steps 7..10 only
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
