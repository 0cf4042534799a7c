"""RM rewards for alignment: cross-tokenizer scoring, calibration temperature, gold rewards, TRL adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.align.generate import sample
from pipeline.align.rewards import GoldReward, RMReward, as_trl_reward, gold_reward_fn, read_temperature
from tests.helpers import policy, policy_tokenizer, reward_model, rm_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one torch thread


PROMPTS = ["\n\nHuman: What is the capital of Peru?\n\nAssistant:", "\n\nHuman: hello there\n\nAssistant:"]


def _reference_scores(model, tok, prompts, responses):
    """One unpadded float32 forward per text with the RM's own tokenizer (+ EOS), read at the last token."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = tok(p + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return np.array(out)


def test_cross_tokenizer_scores_match_the_rms_own_tokenization():
    ptok, rtok = policy_tokenizer(), rm_tokenizer()
    assert len(ptok) != len(rtok) and ptok.get_vocab() != rtok.get_vocab()
    pol, rm = policy(), reward_model()
    out = sample(pol, ptok, PROMPTS, n=3, max_new_tokens=12, seed=0)
    prompts = [p for p, cs in zip(PROMPTS, out.texts) for _ in cs]
    responses = [c for cs in out.texts for c in cs]
    # the policy's own ids would not even be valid RM ids
    assert max(max(c) for cs in out.ids for c in cs if c) >= len(rtok)
    reward = RMReward(rm, rtok, dtype=None, batch_size=4)
    got = reward(prompts, responses)
    assert got.dtype == np.float64 and got.shape == (len(responses),)
    np.testing.assert_allclose(got, _reference_scores(rm, rtok, prompts, responses), rtol=1e-4, atol=1e-5)
    assert reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward(PROMPTS, ["x"])


def test_left_truncation_keeps_the_response():
    rtok, rm = rm_tokenizer(), reward_model()
    long_prompt = "\n\nHuman: " + "hello there " * 200 + "\n\nAssistant:"
    reward = RMReward(rm, rtok, dtype=None, max_length=32)
    got = reward([long_prompt], [" white, mostly"])[0]
    ids = (rtok(long_prompt + " white, mostly", add_special_tokens=False)["input_ids"])[-31:] + [rtok.eos_token_id]
    with torch.no_grad():
        want = float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_rm_directory_and_calibration_temperature(tmp_path):
    rtok, rm = rm_tokenizer(), reward_model(seed=1)
    rm_dir = tmp_path / "more"
    rm.save_pretrained(rm_dir)
    rtok.save_pretrained(rm_dir)
    responses = [" white, mostly", " general kenobi"]
    raw = RMReward(str(rm_dir), dtype=None)(PROMPTS, responses)
    assert read_temperature(rm_dir) is None
    (rm_dir / "temperature.json").write_text(json.dumps({"temperature": 2.5}))
    assert read_temperature(rm_dir) == 2.5
    calibrated = RMReward(str(rm_dir), dtype=None)
    assert calibrated.temperature == 2.5 and calibrated.name == "more"
    np.testing.assert_allclose(calibrated(PROMPTS, responses), raw / 2.5, rtol=1e-6)
    np.testing.assert_allclose(RMReward(str(rm_dir), dtype=None, temperature=1.0)(PROMPTS, responses), raw, rtol=1e-6)
    (rm_dir / "temperature.json").write_text('{"temp": 2}')
    with pytest.raises(ValueError, match="temperature.json"):
        RMReward(str(rm_dir))
    with pytest.raises((OSError, FileNotFoundError), match="reward model"):
        RMReward(str(tmp_path / "missing"))


def test_gold_rewards_and_trl_adapter():
    from pipeline.data import synthetic

    gold = gold_reward_fn("synthetic")
    assert isinstance(gold, GoldReward)
    p = "\n\nHuman: What is the capital of Peru?\n\nAssistant:"
    responses = [" It is Lima.", " zzqx blorf", " I'm sorry, but I can't help with that."]
    np.testing.assert_array_equal(gold([p] * 3, responses), [synthetic.gold_reward(p, r) for r in responses])
    with pytest.raises(ValueError):
        gold_reward_fn("")

    seen = {}

    def reward(prompts, responses):
        seen["prompts"] = prompts
        return np.arange(len(prompts), dtype=float)

    trl_fn = as_trl_reward(reward, "rm")
    assert trl_fn.__name__ == "rm"
    out = trl_fn(
        prompts=["formatted a", "formatted b"],
        completions=["x", "y"],
        completion_ids=[[1], [2]],
        raw_prompt=["raw a", "raw b"],
        trainer_state=None,
    )
    assert out == [0.0, 1.0] and all(isinstance(x, float) for x in out)
    assert seen["prompts"] == ["raw a", "raw b"]  # the RM sees the dataset prompt, not the policy's format
    trl_fn(prompts=["formatted a"], completions=["x"])
    assert seen["prompts"] == ["formatted a"]
