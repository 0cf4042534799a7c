"""Align under chat templates: the policy's prompt rendering and stops, cross-template RM scoring, RJS
completions, the judge's messages (tiny tokenizers with ChatML / Llama-3-style templates)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.align.prompts import policy_prompt, prompt_conversations, sft_completion, turn_stops


Q = [{"role": "user", "content": "How many legs has a horse got?"}]
CONV = json.dumps({"prompt": Q})
PLAIN = "\n\nHuman: How many legs has a horse got?\n\nAssistant:"


def test_policy_prompt_uses_the_policy_template(llama3_tok, tiny_tok):
    rec = {"prompt": PLAIN, "conversation": CONV}
    text, templated = policy_prompt(llama3_tok, rec, "raw")
    assert templated and text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow many legs has a "
        "horse got?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert policy_prompt(tiny_tok, rec, "raw") == (PLAIN, False)  # no template: the plain layout
    assert policy_prompt(tiny_tok, rec, "alpaca")[0].startswith("Below is an instruction")  # alpaca kept
    with pytest.raises(ValueError, match="prompt_style"):
        policy_prompt(llama3_tok, rec, "alpaca")
    assert policy_prompt(llama3_tok, {"prompt": PLAIN}, "raw") == (PLAIN, False)  # text prompts stay text


def test_turn_stops(llama3_tok, chat_tok, tiny_tok):
    eot = llama3_tok.convert_tokens_to_ids("<|eot_id|>")
    assert turn_stops(llama3_tok) == {"stop_token_ids": (eot,), "extra_stop_texts": ("<|eot_id|>",)}
    assert turn_stops(chat_tok)["extra_stop_texts"] == ("<|im_end|>",)
    assert turn_stops(tiny_tok) == {}


def test_sample_stops_at_the_end_of_turn_token(llama3_tok, one_thread):
    """A policy that always emits <|eot_id|> first: with the stop id the completion is empty and ended; the
    templated prompt is encoded without extra special tokens."""
    import torch

    from pipeline.align.generate import sample
    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(), llama3_tok, task="causal_lm", seed=0)
    eot = llama3_tok.convert_tokens_to_ids("<|eot_id|>")
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o.index_fill(-1, torch.tensor([eot]), 50.0))
    prompt, _ = policy_prompt(llama3_tok, {"prompt": PLAIN, "conversation": CONV}, "raw")
    out = sample(model, llama3_tok, [prompt], n=2, max_new_tokens=5, stop_token_ids=(eot,), add_special_tokens=False)
    assert out.texts == [["", ""]] and out.ended == [[True, True]]
    assert out.prompt_ids[0] == llama3_tok(prompt, add_special_tokens=False)["input_ids"]
    free = sample(model, llama3_tok, [prompt], n=1, max_new_tokens=5, add_special_tokens=False)
    assert free.ended == [[False]] and len(free.ids[0][0]) == 5  # without the stop id it runs on


def test_rm_rescored_under_its_own_template(chat_tok, one_thread):
    """Cross-tokenizer: a response generated under the policy's Llama-3 template is scored by a ChatML RM as
    an assistant message under ChatML (never as the policy's templated string)."""
    from pipeline.align.rewards import RMReward
    from pipeline.data.render import templated_pair
    from pipeline.models import TinyModelSpec, tiny_model
    from pipeline.scoring import score_ids

    rm = tiny_model(TinyModelSpec(), chat_tok, task="reward", seed=2).eval()
    reward = RMReward(rm, chat_tok, temperature=1.0, dtype=None, conversations={PLAIN: CONV})
    got = reward([PLAIN, "\n\nHuman: Hi\n\nAssistant:"], [" It has four legs. ", " Hello."])
    p, c, _ = templated_pair(chat_tok, Q, [{"role": "assistant", "content": "It has four legs."}], [])
    assert p + c == (
        "<|im_start|>user\nHow many legs has a horse got?<|im_end|>\n<|im_start|>assistant\n"
        "It has four legs.<|im_end|>\n"
    )
    ref = score_ids(rm, [chat_tok(p + c, add_special_tokens=False)["input_ids"]], chat_tok.pad_token_id, dtype=None)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
    plain = RMReward(rm, chat_tok, temperature=1.0, dtype=None)(
        [PLAIN, "\n\nHuman: Hi\n\nAssistant:"], [" It has four legs. ", " Hello."]
    )
    assert not np.isclose(plain[0], got[0]) and np.isclose(plain[1], got[1])  # text prompts: unchanged path


def test_rjs_completion_is_the_templated_assistant_turn(llama3_tok):
    rec = {"prompt": PLAIN, "conversation": CONV, "templated": True}
    assert sft_completion(llama3_tok, rec, " Four. ") == "Four.<|eot_id|>"
    assert sft_completion(llama3_tok, {"prompt": PLAIN}, " Four. ") == " Four. "


def test_prompt_conversations_and_judge_messages():
    import datasets

    from pipeline.align.judge import judge_prompt
    from pipeline.data.render import encode_conversation

    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": PLAIN,
                "conversation": encode_conversation(
                    Q, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "3"}]
                ),
            },
            {"prompt": "\n\nHuman: x\n\nAssistant:", "conversation": ""},
        ]
    )
    assert {k: json.loads(v) for k, v in prompt_conversations(ds).items()} == {PLAIN: {"prompt": Q}}
    msg = judge_prompt([{"role": "system", "content": "Be kind."}] + Q, "Four.", "Three.", "helpful")
    assert "System: Be kind.\n\nUser: How many legs has a horse got?" in msg and "<|" not in msg


def test_ppo_rollouts_end_at_any_stop_id():
    """PPO's response mask and decoding stop at EOS or a chat template's end-of-turn id (hand-checked)."""
    import torch

    from pipeline.align.ppo import response_mask_from_ids
    from pipeline.align.ppo.trainer import _decode

    resp = torch.tensor([[5, 7, 9, 2], [5, 5, 5, 5], [2, 7, 7, 7]])
    mask, has = response_mask_from_ids(resp, [2, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and has.tolist() == [True, False, True]
    mask1, has1 = response_mask_from_ids(resp, 2)  # one id: the old behaviour
    assert mask1.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]] and has1.tolist() == [True, False, True]

    class Tok:
        def decode(self, toks, skip_special_tokens=True):
            return ",".join(map(str, toks))

    assert _decode(Tok(), resp, mask, [2, 7]) == ["5", "5,5,5,5", ""]
