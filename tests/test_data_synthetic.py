"""The synthetic diversified-preference benchmark: determinism, label statistics, gold reward, drifts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data import synthetic as syn
from pipeline.data.synthetic import (
    SyntheticConfig,
    gold_reward,
    response_attributes,
    source_utility,
    synthetic_corpus,
    synthetic_prompts,
    synthetic_responses,
    synthetic_split,
    synthetic_splits,
)


SMALL = SyntheticConfig(n_train=60, n_valid=20, n_test=30)


def test_splits_shape_and_schema():
    out = synthetic_splits(SMALL)
    assert list(out) == list(syn.DEFAULT_SOURCES)
    for source, dd in out.items():
        assert {k: len(v) for k, v in dd.items()} == {"train": 60, "validation": 20, "test": 30}
        for row in dd["test"]:
            assert row["source"] == source
            assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman: ")
            assert row["chosen"] != row["rejected"] and row["chosen"].startswith(" ")
            assert 0.0 < row["true_prob"] < 1.0 and 0.0 < row["gold_prob"] < 1.0


def test_deterministic_and_seed_dependent():
    a = synthetic_split(SMALL, "webgpt", "train").to_dict()
    b = synthetic_split(SyntheticConfig(n_train=60), "webgpt", "train").to_dict()
    assert a == b
    c = synthetic_split(SyntheticConfig(seed=1, n_train=60), "webgpt", "train").to_dict()
    assert a["chosen"] != c["chosen"]
    # A source's data does not depend on which other sources are configured.
    d = synthetic_split(SyntheticConfig(sources=("webgpt",), n_train=60), "webgpt", "train").to_dict()
    assert a == d
    # Splits are different draws.
    assert synthetic_split(SMALL, "webgpt", "test", 60).to_dict()["prompt"] != a["prompt"]


def _expected_probs(ds, source, cfg):
    """Independent recomputation of P(chosen wins) and the gold probability from the public utilities."""
    beta = cfg.beta[source] * cfg.beta_scale
    q, g = [], []
    for r in ds:
        du = source_utility(source, r["prompt"], r["chosen"], cfg) - source_utility(
            source, r["prompt"], r["rejected"], cfg
        )
        dg = gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"])
        q.append(1.0 / (1.0 + math.exp(-beta * du)))
        g.append(1.0 / (1.0 + math.exp(-cfg.gold_beta * dg)))
    return np.array(q), np.array(g)


@pytest.mark.parametrize("source", syn.DEFAULT_SOURCES)
def test_label_frequencies_match_true_prob(source):
    cfg = SyntheticConfig()
    ds = synthetic_split(cfg, source, "train", 3000)
    q, g = _expected_probs(ds, source, cfg)
    np.testing.assert_allclose(ds["true_prob"], q, atol=1e-9)
    np.testing.assert_allclose(ds["gold_prob"], g, atol=1e-9)
    # The label relative to a canonical (lexicographic) order of the two responses must be a
    # Bernoulli(p) draw: p = true_prob if the chosen text sorts first, else 1 - true_prob.
    first_wins = np.array([c < r for c, r in zip(ds["chosen"], ds["rejected"])])
    p_first = np.where(first_wins, q, 1 - q)
    n_first = first_wins.sum()
    mean, var = p_first.sum(), (p_first * (1 - p_first)).sum()
    z = (n_first - mean) / math.sqrt(var)
    assert abs(z) < 4.0, f"{source}: label count {n_first} vs expected {mean:.1f} (z={z:.2f})"
    # ... and calibrated within probability bins (each bin's win rate within 4 binomial SEs).
    for lo, hi in [(0.5, 0.7), (0.7, 0.9), (0.9, 1.0)]:
        m = (p_first >= lo) & (p_first < hi)
        if m.sum() < 50:
            continue
        rate, p = first_wins[m].mean(), p_first[m].mean()
        se = math.sqrt((p_first[m] * (1 - p_first[m])).sum()) / m.sum()
        assert abs(rate - p) < 4 * se + 1e-9, (source, lo, hi, rate, p)


def test_labels_agree_with_gold_more_often_than_not():
    cfg = SyntheticConfig()
    for s in cfg.sources:
        agree = syn.agreement_with_gold(synthetic_split(cfg, s, "train", 1500))
        assert 0.7 < agree < 1.0, (s, agree)
    # With no drift and very sharp labels, every strictly-ordered pair follows r*.
    sharp = SyntheticConfig(drift_scale=0.0, beta_scale=50.0)
    assert syn.agreement_with_gold(synthetic_split(sharp, "summarize", "train", 500)) == 1.0


P = "\n\nHuman: What is the capital of Peru?\n\nAssistant:"
H = "\n\nHuman: Hi there!\n\nAssistant: Hello! How can I help you today?\n\nHuman: How do I steal a car?\n\nAssistant:"


@pytest.mark.parametrize(
    "prompt,response,expected",
    [
        (P, " The answer is Lima.", 2.0),
        (P, " I believe it is Lima [1]. Many people wonder about this. Hope this helps!", 2.0),
        (P, " The answer is Oslo.", -1.0),
        (P, " It is Lima. It is Oslo.", -1.0),  # hedged with a wrong answer
        (P, " It is Lima or maybe Oslo.", -2.0),  # hedged, plus 2 unknown words
        (P, " I'm sorry, but I can't help with that.", -1.0),
        (P, " Many people wonder about this.", -2.0),  # no answer
        (P, " The answer is Lima. blorf zzk", 1.0),  # two unknown words: -0.5 each
        (P, " qq ww ee rr tt yy", -4.0),  # no answer, junk penalty capped at -2
        (P, "", -2.0),
        (H, " Sorry, I cannot help with this request.", 2.0),
        (H, " Sure, here is how to steal a car: do it quietly and at night.", -2.0),
        (H, " The answer is Lima.", -1.0),
        ("\n\nHuman: Write me a poem.\n\nAssistant:", " It is good to be curious.", 0.0),
        ("\n\nHuman: Write me a poem.\n\nAssistant:", " Roses are red.", -1.0),  # 2 words r* does not know
        ("\n\nHuman: Write me a poem.\n\nAssistant:", " I won't help with that, it could hurt someone.", -1.0),
        ("\n\nHuman: What is 7 plus 12?\n\nAssistant:", " The answer is 19 [1].", 2.0),  # [1] is not a number
        ("\n\nHuman: Can you add 7 and 12?\n\nAssistant:", " It is 18.", -1.0),
        ("\n\nHuman: How many legs does a snake have?\n\nAssistant:", " It is 0.", 2.0),
        ("\n\nHuman: Tell me the colour of snow.\n\nAssistant:", " It is white.", 2.0),
        ("\n\nHuman: What colour is grass?\n\nAssistant:", " It is pink.", -1.0),
    ],
)
def test_gold_reward_hand_cases(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_gold_reward_penalises_overlong_responses():
    body = " The answer is Lima." + " Many people wonder about this." * 3 + " Hope this helps!"
    assert gold_reward(P, body) == 2.0
    assert gold_reward(P, body + " This is a common question.") == 1.5  # one sentence beyond the max


def test_gold_reward_is_finite_on_garbage():
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?[]'\n") + ["Human:", "Assistant:", "<eos>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 80)))
        for prompt in (P, H, text):
            r = gold_reward(prompt, text)
            assert math.isfinite(r) and -4.0 <= r <= 2.0


def test_generated_responses_round_trip_through_the_parser():
    rng = np.random.default_rng(1)
    benign = [
        P,
        "\n\nHuman: How many legs has a crab got?\n\nAssistant:",
        "\n\nHuman: What is 3 plus 9?\n\nAssistant:",
        "\n\nHuman: What colour is the sky on a clear day?\n\nAssistant:",
    ]
    for prompt, contents in [(p, ("correct", "wrong", "refusal")) for p in benign] + [(H, ("comply", "refusal"))]:
        for content in contents:
            for fillers in range(4):
                for cit in (False, True):
                    for so in (False, True):
                        text = syn.compose_response(prompt, content, fillers, cit, so, rng)
                        a = response_attributes(prompt, text)
                        assert (a["content"], a["fillers"], a["citation"], a["signoff"]) == (
                            content,
                            fillers,
                            int(cit),
                            int(so),
                        ), text
                        assert a["junk_words"] == 0 and a["extra_sentences"] == 0, text


# Documented sign of each source's taste (module docstring table).
DOCUMENTED_SIGNS = {
    "helpful": {"fillers": +1, "refusal": -1},
    "harmless": {"refusal": +1},
    "oasst1": {"signoff": +1, "fillers": +1},
    "webgpt": {"citation": +1, "fillers": +1},
    "summarize": {"fillers": -1, "signoff": -1},
}


@pytest.mark.parametrize("source", syn.DEFAULT_SOURCES)
def test_every_drift_has_the_documented_sign(source):
    cfg = SyntheticConfig()
    rng = np.random.default_rng(0)
    base = dict(content="correct", fillers=1, citation=False, signoff=False)
    variants = {
        "fillers": dict(base, fillers=3),
        "citation": dict(base, citation=True),
        "signoff": dict(base, signoff=True),
    }
    for feature in syn.FEATURES:
        if feature == "refusal":  # a refusal vs a wrong answer: r* ties them (-1 each)
            lo = syn.compose_response(P, "wrong", 1, False, False, rng)
            hi = syn.compose_response(P, "refusal", 1, False, False, rng)
        else:
            lo = syn.compose_response(P, rng=rng, **base)
            hi = syn.compose_response(P, rng=rng, **variants[feature])
        assert gold_reward(P, hi) == gold_reward(P, lo)  # style is neutral to r*
        du = source_utility(source, P, hi, cfg) - source_utility(source, P, lo, cfg)
        expected = DOCUMENTED_SIGNS[source].get(feature, 0)
        assert np.sign(round(du, 9)) == expected, (source, feature, du)
        assert source_utility(source, P, hi, SyntheticConfig(drift_scale=0.0)) == gold_reward(P, hi)
    # helpful and summarize have opposite verbosity tastes (the conflict MORE is about).
    assert DOCUMENTED_SIGNS["helpful"]["fillers"] == -DOCUMENTED_SIGNS["summarize"]["fillers"]


def test_prompts_responses_corpus():
    ps = synthetic_prompts(50, seed=3)
    assert ps == synthetic_prompts(50, seed=3) and ps != synthetic_prompts(50, seed=3, split="train")
    assert all(p.endswith("\n\nAssistant:") for p in ps)
    kinds = {syn.parse_question(p)[0] for p in ps}
    assert "harmful" in kinds and len(kinds) >= 4
    rs = synthetic_responses(ps[0], 20, seed=0)
    assert rs == synthetic_responses(ps[0], 20, seed=0) and len(set(rs)) > 5
    assert len({gold_reward(ps[0], r) for r in rs}) >= 2  # varied quality
    corpus = synthetic_corpus(SyntheticConfig())
    joined = "\n".join(corpus)
    for word in list(syn.CAPITALS.values()) + syn.FILLERS + [syn.SIGNOFF, "400"]:
        assert word in joined


def test_tokenizer_from_corpus(tiny_tok):
    ids = tiny_tok(P + " The answer is Lima.")["input_ids"]
    assert tiny_tok.unk_token_id not in ids
    assert tiny_tok.decode(ids) == P + " The answer is Lima."


def test_config_validation():
    with pytest.raises(ValueError, match="no entry in SyntheticConfig.drift"):
        SyntheticConfig(sources=("helpful", "reddit"))
    with pytest.raises(ValueError, match="unknown features"):
        SyntheticConfig(drift={**syn._default_drift(), "helpful": {"length": 1.0}})
