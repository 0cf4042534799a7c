"""The batched sampler: prompt format, left padding, order restoration, EOS stopping."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.align.generate import (
    ALPACA_TEMPLATE,
    Completions,
    cut_at_eos,
    cut_at_stop_texts,
    encode_prompts,
    format_prompt,
    pad_left,
    sample,
)
from tests.helpers import policy, policy_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one torch thread


PROMPTS = [
    "\n\nHuman: What is the capital of Peru?\n\nAssistant:",
    "\n\nHuman: hi",
    "\n\nHuman: How many legs does a spider have? And the quick brown fox jumps over the lazy dog\n\nAssistant:",
    "the",
    "\n\nHuman: How do I steal a car?\n\nAssistant: I'm sorry\n\nHuman: please\n\nAssistant:",
]


def test_format_prompt_raw_and_alpaca():
    p = "\n\nHuman: What colour is snow?\n\nAssistant:"
    assert format_prompt(p, "raw") == p
    assert format_prompt(p, "alpaca") == ALPACA_TEMPLATE.format(instruction="What colour is snow?")
    assert format_prompt("## Human:\nSummarize this.\n\n## Assistant:\n", "alpaca") == ALPACA_TEMPLATE.format(
        instruction="Summarize this."
    )
    multi = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What colour is snow?\n\nAssistant:"
    out = format_prompt(multi, "alpaca")
    # earlier turns are kept as the instruction; only the final assistant marker goes
    assert "Human: hi\n\nAssistant: hello\n\nHuman: What colour is snow?" in out
    assert out.endswith("### Response:\n") and not out.rstrip().endswith("Assistant:")
    with pytest.raises(ValueError, match="prompt_style"):
        format_prompt(p, "chatml")


def test_pure_helpers():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([4, 5, 2, 6, 2], {2}) == ([4, 5], True)
    assert cut_at_eos([4, 5], {2}) == ([4, 5], False)
    assert cut_at_eos([9, 4, 3], {2, 3}) == ([9, 4], True)
    assert cut_at_stop_texts(" fine.\n\nHuman: more", ["\n\nHuman:"]) == " fine."
    assert cut_at_stop_texts("abc", ["x", "c", "b"]) == "a"
    c = Completions(texts=[["a", "b"]], ids=[[[1, 2], [3]]], ended=[[True, False]])
    assert c.n_new_tokens == 3 + 1  # EOS counts as a generated token


class _FakeTok:
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] + [10 + len(w) for w in t.split()] for t in texts]}


def test_encode_prompts_left_truncation_keeps_bos():
    out = encode_prompts(_FakeTok(), ["a bb ccc dddd eeeee", "a"], max_prompt_length=3)
    assert out == [[1, 14, 15], [1, 11]]  # BOS + the LAST tokens; short prompts untouched
    assert encode_prompts(_FakeTok(), ["a bb"], None) == [[1, 11, 12]]


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_batched_greedy_equals_alone_and_order_is_restored(arch):
    """Left padding is correct iff every prompt decodes the same batched (with others) as alone."""
    tok = policy_tokenizer()
    model = policy(arch)
    batched = sample(model, tok, PROMPTS, n=2, do_sample=False, max_new_tokens=10, batch_size=3, seed=0)
    assert len(batched.texts) == len(PROMPTS) and all(len(t) == 2 for t in batched.texts)
    lengths = [len(p) for p in batched.prompt_ids]
    assert len(set(lengths)) > 2  # really different lengths, so really padded
    for i, p in enumerate(PROMPTS):
        alone = sample(model, tok, [p], n=1, do_sample=False, max_new_tokens=10, seed=0)
        assert batched.ids[i][0] == alone.ids[0][0], f"prompt {i} decodes differently when batched"
        assert batched.ids[i][1] == alone.ids[0][0]
        assert batched.texts[i][0] == alone.texts[0][0]
        assert batched.prompt_ids[i] == tok(p)["input_ids"]


def test_sampling_counts_settings_and_seed():
    tok = policy_tokenizer()
    model = policy()
    a = sample(model, tok, PROMPTS, n=3, temperature=1.2, top_p=0.9, max_new_tokens=6, batch_size=2, seed=3)
    b = sample(model, tok, PROMPTS, n=3, temperature=1.2, top_p=0.9, max_new_tokens=6, batch_size=2, seed=3)
    assert a.ids == b.ids  # seeded
    assert all(len(c) <= 6 for cs in a.ids for c in cs)
    assert len({tuple(c) for cs in a.ids for c in cs}) > len(PROMPTS)  # samples differ
    forced = sample(model, tok, PROMPTS[:2], n=2, max_new_tokens=5, min_new_tokens=5, seed=0)
    assert all(len(c) == 5 and not e for cs, es in zip(forced.ids, forced.ended) for c, e in zip(cs, es))
    with pytest.raises(ValueError, match="temperature"):
        sample(model, tok, PROMPTS, temperature=0.0)


def test_stops_at_eos_and_cuts_it():
    """Declare as EOS a token the greedy decode emits at step k: every completion must stop right there."""
    tok = copy.deepcopy(policy_tokenizer())
    model = policy()
    free = sample(model, tok, PROMPTS[:1], n=1, do_sample=False, max_new_tokens=12, seed=0).ids[0][0]
    k = 3
    stop_id = free[k]
    first = free.index(stop_id)
    tok.eos_token = tok.convert_ids_to_tokens(stop_id)
    model.generation_config.eos_token_id = stop_id
    out = sample(model, tok, PROMPTS[:1] * 2, n=2, do_sample=False, max_new_tokens=12, seed=0)
    for cs, es in zip(out.ids, out.ended):
        for c, e in zip(cs, es):
            assert c == free[:first] and e
    sampled = sample(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=1)
    for cs, es in zip(sampled.ids, sampled.ended):
        for c, e in zip(cs, es):
            assert stop_id not in c
            assert e or len(c) == 12


def test_alpaca_prompts_reach_the_model():
    tok = policy_tokenizer()
    model = policy()
    out = sample(
        model, tok, [format_prompt(PROMPTS[0], "alpaca")], n=1, do_sample=False, max_new_tokens=3, max_prompt_length=8
    )
    assert len(out.prompt_ids[0]) == 8  # left-truncated to the limit
    assert out.prompt_ids[0] == tok(format_prompt(PROMPTS[0], "alpaca"))["input_ids"][-8:]
    assert torch.is_grad_enabled()  # the no_grad decorator does not leak


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_static_cache_backend_matches_plain_generate(arch):
    tok, model = policy_tokenizer(), policy(arch)
    plain = sample(model, tok, PROMPTS, n=2, do_sample=False, max_new_tokens=8, batch_size=3)
    static = sample(model, tok, PROMPTS, n=2, do_sample=False, max_new_tokens=8, batch_size=3, backend="static")
    assert static.ids == plain.ids
    with pytest.raises(ValueError, match="backend"):
        sample(model, tok, PROMPTS, backend="vllm")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="continuous batching is a GPU option (on CPU one call takes ~30 s)"
)
def test_continuous_batching_backend_matches_plain_generate():
    """transformers' continuous batching (paged KV cache) on a Llama: same greedy continuations, input order.

    On CPU its background scheduler needs ~30 s even for 4 tokens of one tiny request (measured), so it
    runs where it is meant to be used."""
    tok, model = policy_tokenizer(), policy("llama").cuda()
    plain = sample(model, tok, PROMPTS[:3], n=2, do_sample=False, max_new_tokens=6)
    cont = sample(model, tok, PROMPTS[:3], n=2, do_sample=False, max_new_tokens=6, backend="continuous")
    assert cont.ids == plain.ids and cont.ended == plain.ended


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_shared_prompt_prefill_equals_plain_generate(arch):
    """Encoding each prompt once and sharing its KV cache among the n samples changes nothing but the cost:
    argmax sampling (top_k=1) gives identical rows, and seeded sampling draws the same tokens."""
    from pipeline.align.generate import generate_rows, generation_config

    tok, model = policy_tokenizer(), policy(arch)
    ids = encode_prompts(tok, PROMPTS, None)
    for top_k, seed in ((1, None), (0, 5)):
        cfg = generation_config(
            n=3,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=top_k,
            max_new_tokens=8,
            min_new_tokens=0,
            eos_ids=[tok.eos_token_id],
            pad_id=tok.pad_token_id,
        )
        runs = []
        for share in (False, True):
            if seed is not None:
                torch.manual_seed(seed)
            runs.append(generate_rows(model, ids, cfg, n=3, pad_id=tok.pad_token_id, batch_size=3, share_prompt=share))
        assert runs[0] == runs[1]
        assert all(len(r) == 3 for r in runs[1])
