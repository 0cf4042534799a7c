"""Every reward the project computes equals the model's own forward pass on that sequence alone.

The reference is `model(input_ids=seq[None]).logits[0, 0]`: unbatched, no padding, no attention mask, no code
shared with the scorer or the trainer. It is compared, within 1e-5 in fp32, with the padded and the packed
scorer (pipeline.scoring) and the packed trainer (pipeline.reward.trainer) for tiny random Llama, Qwen2, GPT-2,
GPT-NeoX, sliding-window Mistral / Qwen2 and Gemma-2 / Qwen2 with alternating sliding and full layers in sdpa
and eager attention, for an RM whose config pads with
EOS and one whose config has no pad id (the caller always pads with another id), for empty completions and
pre-tokenized rows that end in pad tokens. A configuration that cannot be packed exactly must fall back, with
`packing_problem` saying why.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from pipeline.layout import packed_attention_mask, packing_problem, readout_index
from pipeline.scoring import score_ids, score_pair_ids


VOCAB, CALLER_PAD, MODEL_PAD, EOS = 48, 1, 2, 3
WINDOW = 4  # shorter than every packed pair below
ARCHS = [
    "llama",
    "qwen2",
    "gpt2",
    "gpt_neox",
    "mistral_window",
    "qwen2_window",
    "qwen2_mixed",
    "gemma2",
    "mistral_mixed",
]


def _config(arch: str, pad_id, eos_id, vocab: int):
    llama_like = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        cfg = LlamaConfig(**llama_like)
    elif arch == "qwen2":
        cfg = Qwen2Config(**llama_like)
    elif arch == "mistral_window":
        cfg = MistralConfig(**llama_like, sliding_window=WINDOW)
    elif arch == "qwen2_window":  # every layer slides
        cfg = Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
    elif arch == "qwen2_mixed":  # layer 0 full, layer 1 sliding: one packed mask per layer type
        cfg = Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    elif arch == "gemma2":  # alternating sliding and full layers, attention-logit soft-capping
        cfg = Gemma2Config(**llama_like, head_dim=8, sliding_window=WINDOW)
    elif arch == "mistral_mixed":  # layer types its forward ignores (it takes one mask): cannot be packed
        cfg = MistralConfig(**llama_like, sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"])
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            rotary_pct=0.25,
            max_position_embeddings=128,
        )
    else:
        raise ValueError(arch)
    cfg.num_labels, cfg.pad_token_id, cfg.eos_token_id = 1, pad_id, eos_id
    cfg.initializer_range = 0.3  # large random weights: a wrong mask or read-out moves rewards by far more than 1e-5
    return cfg


def _model(arch: str, impl: str, pad_id=MODEL_PAD, eos_id=EOS, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _config(arch, pad_id, eos_id, vocab)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():  # rewards of order 1: spread enough to expose a wrong read-out, fp32 noise well below 1e-5
        model.score.weight.normal_(0, 0.2)
    return model


def _reference(model, seq) -> float:
    """The model's own forward pass on `seq` alone."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(seq)])).logits[0, 0].item()


def _pairs(pad_id, eos, rng: random.Random):
    """Pre-tokenized pairs: ordinary ones, empty chosen / rejected / both completions, no EOS, sides ending in the
    model's pad id, no shared prefix, chosen a prefix of rejected, a one-token prompt."""

    def words(k):
        return [rng.randrange(4, VOCAB) for _ in range(k)]

    end = [eos] if eos is not None else []
    pairs = []
    for _ in range(3):
        p = words(rng.randint(5, 8))
        pairs.append((p + words(rng.randint(1, 4)) + end, p + words(rng.randint(1, 5)) + end))
    p = words(6)
    pairs.append((p + end, p + words(3) + end))  # empty chosen completion
    pairs.append((p + words(2) + end, p + end))  # empty rejected completion
    pairs.append((p + end, p + end))  # both empty
    pairs.append((p + words(3), p + words(2)))  # no EOS
    pad = [pad_id] if pad_id is not None else []
    pairs.append((p + words(2) + end + pad, p + words(3) + pad + pad))  # ending in the model's pad id
    pairs.append((words(5), words(4)))  # nothing shared
    pairs.append((p + words(2), p + words(2) + words(3)))  # chosen a prefix of rejected
    q = words(1)
    pairs.append((q + words(4) + end, q + words(2) + end))  # one-token prompt
    return pairs


CASES = [
    (arch, impl, "distinct") for arch in ARCHS for impl in ("sdpa", "eager") if (arch, impl) != ("gemma2", "sdpa")
] + [("llama", impl, pad) for impl in ("sdpa", "eager") for pad in ("eos", "none")]


def _pad_convention(pad: str):
    """(the model config's pad id, its EOS id): distinct ids, pad = EOS (common for Llama RMs), or no pad id."""
    return {"distinct": (MODEL_PAD, EOS), "eos": (EOS, EOS), "none": (None, EOS)}[pad]


@pytest.mark.parametrize("arch,impl,pad", CASES)
def test_padded_and_packed_scores_equal_each_sequences_own_forward(arch, impl, pad):
    pad_id, eos = _pad_convention(pad)
    model = _model(arch, impl, pad_id, eos)
    pairs = _pairs(pad_id, eos, random.Random(hash((arch, impl, pad)) % 1000))
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    ref_c = np.array([_reference(model, c) for c in chosen])
    ref_r = np.array([_reference(model, r) for r in rejected])
    assert np.ptp(ref_c) > 0.5  # rewards that differ: a wrong read-out would show

    problem = packing_problem(model)
    assert (problem is None) == (arch != "mistral_mixed"), problem
    for share_prefix in (True, False):  # packed (where exact), padded
        r_c, r_r = score_pair_ids(
            model, chosen, rejected, CALLER_PAD, batch_size=6, dtype=None, share_prefix=share_prefix
        )
        np.testing.assert_allclose(r_c, ref_c, atol=1e-5, rtol=0)
        np.testing.assert_allclose(r_r, ref_r, atol=1e-5, rtol=0)
    padded = score_ids(model, chosen + rejected, CALLER_PAD, batch_size=5, dtype=None)
    np.testing.assert_allclose(padded, np.concatenate([ref_c, ref_r]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arch,impl,pad",
    [
        ("llama", "eager", "distinct"),
        ("mistral_window", "sdpa", "distinct"),
        ("gemma2", "eager", "distinct"),
        ("llama", "sdpa", "eos"),
    ],
)
def test_packed_trainer_rewards_and_loss_equal_each_sequences_own_forward(tmp_path, arch, impl, pad):
    """The packed trainer's rewards and Bradley-Terry loss (with margins) are those of each sequence's own forward
    pass, for eager attention, a sliding window shorter than the pair, alternating sliding and full layers (one
    mask per layer type), and an RM that pads with EOS (rows ending in EOS are read before it)."""
    from pipeline.reward.trainer import MORERewardTrainer
    from tests import reward_helpers as H

    tok = H.tokenizer()
    if pad == "eos":  # TRL sets the model's config pad id to the tokenizer's: a Llama RM's tokenizer pads with EOS
        tok.pad_token = tok.eos_token
    pad_id = tok.pad_token_id
    model = _model(arch, impl, pad_id, tok.eos_token_id, vocab=len(tok))
    pairs = _pairs(pad_id, tok.eos_token_id, random.Random(3))
    rows = [
        {"chosen_ids": c, "rejected_ids": r, "source_id": i % 3, "margin": 0.1 * (i % 4)}
        for i, (c, r) in enumerate(pairs)
    ]
    t = MORERewardTrainer(
        model,
        H.config(tmp_path, "multitask", packing_max_tokens=40, per_device_train_batch_size=len(rows)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    assert t.packed
    batch = t.data_collator(rows)
    assert batch["input_ids"].shape[0] < len(rows)  # several pairs per row
    t.model.eval()
    with torch.no_grad():
        loss, outputs = t.compute_loss(t.model, dict(batch), return_outputs=True)
    ref_c = torch.tensor([_reference(model, c) for c, _ in pairs])
    ref_r = torch.tensor([_reference(model, r) for _, r in pairs])
    margin = torch.tensor([row["margin"] for row in rows])
    torch.testing.assert_close(outputs.logits.reshape(-1), torch.cat([ref_c, ref_r]), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, -F.logsigmoid(ref_c - ref_r - margin).mean(), atol=1e-5, rtol=0)


def test_readout_index_follows_the_models_pad_id():
    assert readout_index([5, 6, 7], 2) == 2
    assert readout_index([5, 6, 2, 2], 2) == 1  # trailing pad ids (e.g. EOS when the config pads with it)
    assert readout_index([2, 2], 2) == 0  # all pad: transformers' argmax of zeros
    assert readout_index([5, 2, 6], None) == 2  # no pad id: the last token


def test_packed_attention_mask_per_implementation():
    """sdpa gets the boolean mask, eager an additive one (0 / dtype min), and a sliding window cuts keys at
    positions p - window and below; the window follows the position ids (restarted per sequence)."""
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    sdpa = packed_attention_mask(_model("llama", "sdpa"), mask, pos)
    assert sdpa.dtype == torch.bool and torch.equal(sdpa, mask)
    eager = packed_attention_mask(_model("llama", "eager"), mask, pos)
    assert eager.dtype == torch.float32
    assert torch.equal(eager == 0, mask) and (eager[~mask] == torch.finfo(torch.float32).min).all()
    windowed = packed_attention_mask(_model("mistral_window", "sdpa"), mask, pos)
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(windowed[0, 0], (k <= q) & (k > q - WINDOW))


def test_packing_problem_names_why_a_model_is_not_packed():
    from tests import reward_helpers as H

    assert packing_problem(_model("llama", "sdpa")) is None and packing_problem(_model("gpt2", "eager")) is None
    assert packing_problem(_model("qwen2_mixed", "sdpa")) is None  # one mask per layer type
    assert "takes one mask for all" in packing_problem(_model("mistral_mixed", "sdpa"))
    assert "not a decoder" in packing_problem(H.model("bert", H.tokenizer()))
    model = _model("llama", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    assert "flash_attention_2" in packing_problem(model)
    model.config._attn_implementation_internal = None  # unknown: not taken for eager
    assert "no attention implementation" in packing_problem(model)


def test_eager_packed_scoring_under_bf16_autocast():
    """The additive eager mask also serves bf16 autocast (scores close to fp32, no dtype clash)."""
    model = _model("llama", "eager")
    pairs = _pairs(MODEL_PAD, EOS, random.Random(7))
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    fp32 = score_pair_ids(model, chosen, rejected, CALLER_PAD, dtype=None)
    bf16 = score_pair_ids(model, chosen, rejected, CALLER_PAD, dtype=torch.bfloat16)
    np.testing.assert_allclose(np.concatenate(bf16), np.concatenate(fp32), atol=0.1)
