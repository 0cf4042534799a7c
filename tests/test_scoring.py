"""Batched RM scoring: same rewards as one-at-a-time, input order kept, left truncation, fp32 head."""

import numpy as np
import torch

from pipeline.data.tokenize import encode_left
from pipeline.models import TinyModelSpec, tiny_model
from pipeline.scoring import score_ids, score_texts


def test_batched_scores_equal_one_at_a_time(tiny_tok):
    model = tiny_model(TinyModelSpec(arch="llama"), tiny_tok, task="reward")
    texts = ["\n\nHuman: hi\n\nAssistant:" + " yes" * k for k in (5, 1, 9, 3, 1, 7)]
    batched = score_texts(model, tiny_tok, texts, max_length=16, batch_size=4, dtype=None)
    single = [score_texts(model, tiny_tok, [t], max_length=16, batch_size=1, dtype=None)[0] for t in texts]
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # left truncation: a long text scores like its last 16 tokens
    ids, n = encode_left(tiny_tok, texts, 16)
    assert n >= 1 and all(len(i) <= 16 for i in ids)


def test_bf16_scoring_keeps_fp32_head_precision(tiny_tok):
    model = tiny_model(TinyModelSpec(arch="gpt_neox"), tiny_tok, task="reward")
    ids = [
        torch.randint(4, len(tiny_tok), (12,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(64)
    ]
    fp32 = score_ids(model, ids, tiny_tok.pad_token_id, dtype=None)
    bf16 = score_ids(model, ids, tiny_tok.pad_token_id, dtype=torch.bfloat16, temperature=2.0)
    np.testing.assert_allclose(bf16 * 2.0, fp32, atol=0.05)
    # a bf16 head output would leave only a few hundred distinct values on this range; fp32 keeps all
    assert len(np.unique(bf16)) == len(ids)


def test_left_truncation_keeps_bert_special_tokens():
    """A BERT-style tokenizer keeps [CLS] (its pooling token) first and [SEP] last after left truncation."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "a", "b", "c"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    ids, n = encode_left(tok, ["a b c hello world", "hello"], 5)
    assert n == 1
    assert ids[0] == [2, 9, 5, 6, 3]  # [CLS] c hello world [SEP]: the oldest tokens went
    assert ids[1] == [2, 5, 3]


import pytest  # noqa: E402

from pipeline.scoring import score_pair_ids, score_pairs  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "bert"])
def test_shared_prefix_scoring_equals_full_sequences(tiny_tok, arch):
    """Encoding the common prompt once (KV cache) gives the rewards of scoring each full text."""
    model = tiny_model(TinyModelSpec(arch=arch), tiny_tok, task="reward", seed=3)
    prompts = [
        "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "\n\nHuman: hi\n\nAssistant:",
        "\n\nHuman: How many legs does a spider have? Tell me.\n\nAssistant:",
        "",
    ]
    chosen = [" Paris. Hope this helps!", " Hello there, friend.", " Eight.", "same start A"]
    rejected = [" I cannot help with that.", " Hello.", " Eight legs, I think [1].", "same start B and more"]
    full_c = score_texts(model, tiny_tok, [p + c for p, c in zip(prompts, chosen)], max_length=24, dtype=None)
    full_r = score_texts(model, tiny_tok, [p + r for p, r in zip(prompts, rejected)], max_length=24, dtype=None)
    r_c, r_r = score_pairs(
        model, tiny_tok, prompts, chosen, rejected, max_length=24, batch_size=4, dtype=None, share_prefix=True
    )
    np.testing.assert_allclose(r_c, full_c, atol=1e-5)
    np.testing.assert_allclose(r_r, full_r, atol=1e-5)
    # and under bf16 autocast, close to fp32
    b_c, _ = score_pairs(
        model, tiny_tok, prompts, chosen, rejected, max_length=24, dtype=torch.bfloat16, share_prefix=True
    )
    np.testing.assert_allclose(b_c, full_c, atol=0.05)


def test_pairs_without_common_prefix_fall_back(tiny_tok):
    model = tiny_model(TinyModelSpec(arch="gpt_neox"), tiny_tok, task="reward")
    r_c, r_r = score_pair_ids(
        model,
        [[5, 6, 7], [5, 6, 7, 8, 9]],
        [[9, 8, 7], [5, 6, 7, 1, 2]],
        tiny_tok.pad_token_id,
        dtype=None,
        share_prefix=True,
    )
    full = score_ids(
        model, [[5, 6, 7], [5, 6, 7, 8, 9], [9, 8, 7], [5, 6, 7, 1, 2]], tiny_tok.pad_token_id, dtype=None
    )
    np.testing.assert_allclose(np.concatenate([r_c, r_r]), full, atol=1e-5)
