"""Perplexity of reference answers, response tokens only, against a brute-force float64 loop."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.align.perplexity import masked_nll_sum, response_nll, response_perplexity
from tests.helpers import policy, policy_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one torch thread


def test_masked_nll_sum_hand_computed():
    # vocab 2, uniform logits at t=0 and a confident logit at t=1: labels at t=1, t=2 count
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 0]])
    total, count = masked_nll_sum(logits, labels)
    # position 0 predicts token 1 with p=1/2; position 1 predicts token 0 with p=3/4
    assert count == 2
    assert total == pytest.approx(-math.log(0.5) - math.log(0.75), rel=1e-12)
    assert masked_nll_sum(logits, torch.full((1, 3), -100)) == (0.0, 0)


def _brute_force(model, tok, prompts, responses):
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            p_ids = tok(p)["input_ids"]
            r_ids = tok(r, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + r_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for j, t in enumerate(r_ids):
                total -= float(logp[len(p_ids) + j - 1, t])
                count += 1
    return total, count


def test_response_perplexity_matches_brute_force_and_ignores_prompt_tokens():
    tok, model = policy_tokenizer(), policy()
    prompts = [
        "\n\nHuman: What is the capital of Peru?\n\nAssistant:",
        "\n\nHuman: hi\n\nAssistant:",
        "\n\nHuman: How many legs does a spider have? the quick brown fox\n\nAssistant:",
    ]
    answers = [" It is Lima. Hope this helps!", " A spider has 8 legs.", " I'm sorry"]
    want_total, want_count = _brute_force(model, tok, prompts, answers)
    for bs in (1, 2, 8):
        total, count = response_nll(model, tok, prompts, answers, batch_size=bs)
        assert count == want_count
        assert total == pytest.approx(want_total, rel=1e-5)
    ppl = response_perplexity(model, tok, prompts, answers)
    assert ppl == pytest.approx(math.exp(want_total / want_count), rel=1e-5)
    assert ppl > 1
    # a token-pooled mean: the single-answer perplexities do not simply average
    assert response_perplexity(model, tok, prompts[:1], answers[:1]) == pytest.approx(
        math.exp(
            _brute_force(model, tok, prompts[:1], answers[:1])[0]
            / _brute_force(model, tok, prompts[:1], answers[:1])[1]
        ),
        rel=1e-5,
    )


def test_left_truncation_keeps_the_answer():
    tok, model = policy_tokenizer(), policy()
    long_prompt = "\n\nHuman: " + "the quick brown fox " * 50 + "\n\nAssistant:"
    answer = " It is Lima."
    n_answer = len(tok(answer, add_special_tokens=False)["input_ids"])
    total, count = response_nll(model, tok, [long_prompt], [answer], max_length=16)
    assert count == n_answer
    p_ids = tok(long_prompt)["input_ids"][-(16 - n_answer) :]
    r_ids = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + r_ids])).logits[0].double(), -1)
    want = -sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(r_ids))
    assert total == pytest.approx(want, rel=1e-5)
