"""train_ppo end to end on the synthetic benchmark (single process, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.align.ppo import PPOConfig, train_ppo


def _gold(prompts, responses):
    from pipeline.data.synthetic import gold_reward

    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def _small_cfg(**kw):
    base = dict(
        num_steps=2,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        learning_rate=1e-3,
        max_new_tokens=8,
        max_prompt_length=48,
        progress=False,
    )
    return PPOConfig(**{**base, **kw})


def _tiny_policy(tok, seed=0):
    from pipeline.models import TinyModelSpec, tiny_model

    return tiny_model(TinyModelSpec(arch="gpt_neox"), tok, task="causal_lm", seed=seed)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_ppo_raises_gold_reward_on_synthetic_benchmark(tiny_tok, tmp_path, one_thread):
    """A warm-started tiny policy trained by PPO on r* gets a higher gold reward: in its own rollouts
    (last 3 steps vs first 3) and on held-out prompts (before vs after)."""
    from transformers import AutoModelForCausalLM

    from pipeline.align.policy import sample_responses
    from pipeline.data.synthetic import synthetic_prompts, synthetic_responses
    from pipeline.policy.warm_start import warm_start_policy

    train = synthetic_prompts(200, seed=1, split="train")
    policy = warm_start_policy(
        tiny_tok,
        [p for p in train for _ in range(4)],
        [r for p in train for r in synthetic_responses(p, 4, seed=1)],
        seed=0,
    )
    held_out = synthetic_prompts(128, seed=5, split="test")

    def held_out_gold(model):
        texts, _ = sample_responses(model, tiny_tok, held_out, max_new_tokens=40, seed=0)
        return float(np.mean(_gold(held_out, texts)))

    before = held_out_gold(policy)
    cfg = PPOConfig(
        num_steps=24,
        rollout_batch_size=32,
        mini_batch_size=16,
        ppo_epochs=4,
        learning_rate=1e-3,
        kl_coef=0.02,
        max_new_tokens=40,
        max_prompt_length=64,
        seed=0,
        progress=False,
    )
    out = train_ppo(
        policy, tiny_tok, synthetic_prompts(256, seed=3, split="train"), _gold, cfg, tmp_path, gold_fn=_gold
    )
    after = held_out_gold(policy)

    log = out["log"]
    assert [r["step"] for r in log] == list(range(1, 25))
    gold = np.array([r["gold_mean"] for r in log])
    first, last = gold[:3].mean(), gold[-3:].mean()
    print(f"PPO gold reward: rollouts first3 {first:.3f} -> last3 {last:.3f}; held-out {before:.3f} -> {after:.3f}")
    assert last > first + 0.3, gold
    assert after > before + 0.5, (before, after)
    assert out["first_gold_mean"] == pytest.approx(first) and out["last_gold_mean"] == pytest.approx(last)
    # the reference is an exact copy of the starting policy, then the policy moves away from it
    assert log[0]["kl_mean"] == pytest.approx(0.0, abs=1e-4)
    assert log[-1]["kl_mean"] > 0.5
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "score_mean", "eos_fraction"):
        assert all(np.isfinite(r[key]) for r in log), key
    # artifacts: per-step JSONL, summary, a loadable HF policy equal to the trained one
    lines = (tmp_path / "ppo_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 25))
    assert json.loads((tmp_path / "ppo_summary.json").read_text())["steps"] == 24
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, policy.state_dict()[k])
    assert (tmp_path / "policy" / "tokenizer.json").exists()
    assert (tmp_path / "policy" / "value_model.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written leftovers


def test_ppo_lora_uses_adapter_disabled_reference_and_saves_merged_policy(tiny_tok, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    from pipeline.data.synthetic import synthetic_prompts

    policy = _tiny_policy(tiny_tok)
    start = _weights(policy)
    cfg = _small_cfg(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["query_key_value", "dense"])
    out = train_ppo(policy, tiny_tok, synthetic_prompts(8, seed=0), _gold, cfg, tmp_path)
    assert out["log"][0]["kl_mean"] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: policy == reference
    assert out["log"][1]["kl_mean"] != 0.0
    assert not (tmp_path / "policy" / "adapter_config.json").exists()  # merged into a plain causal LM
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    changed = [k for k, v in saved.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and all("query_key_value" in k or "dense" in k for k in changed), changed
    with pytest.raises(ValueError, match="adapter-disabled"):
        train_ppo(
            _tiny_policy(tiny_tok), tiny_tok, ["x"], _gold, cfg, tmp_path / "b", ref_policy=_tiny_policy(tiny_tok)
        )


def test_ppo_separate_critic(tiny_tok, tmp_path, one_thread):
    from safetensors.torch import load_file

    from pipeline.data.synthetic import synthetic_prompts

    policy = _tiny_policy(tiny_tok)
    out = train_ppo(policy, tiny_tok, synthetic_prompts(8, seed=0), _gold, _small_cfg(value_model="critic"), tmp_path)
    assert len(out["log"]) == 2 and np.isfinite(out["log"][-1]["value_loss"])
    value = load_file(str(tmp_path / "policy" / "value_model.safetensors"))
    assert any(k.startswith("critic.") for k in value) and "value_head.weight" in value
    # the critic is its own copy: training it did not tie it to the policy's backbone
    assert not torch.equal(value["critic.embed_in.weight"], policy.gpt_neox.embed_in.weight.detach())


def test_ppo_resume_after_crash_matches_uninterrupted_run(tiny_tok, tmp_path, one_thread):
    from pipeline.data.synthetic import synthetic_prompts

    prompts = synthetic_prompts(12, seed=0)
    cfg = _small_cfg(num_steps=4, save_every=1)
    straight = _tiny_policy(tiny_tok)
    train_ppo(straight, tiny_tok, prompts, _gold, cfg, tmp_path / "a")

    calls = {"n": 0}

    def flaky(ps, rs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("reward server went away")
        return _gold(ps, rs)

    with pytest.raises(RuntimeError, match="went away"):
        train_ppo(_tiny_policy(tiny_tok), tiny_tok, prompts, flaky, cfg, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text()) == {"step": 2, "dir": "step-000002"}
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint").iterdir()) == ["state.json", "step-000002"]
    assert not (tmp_path / "b" / "policy").exists()
    resumed = _tiny_policy(tiny_tok)
    out = train_ppo(resumed, tiny_tok, prompts, _gold, cfg, tmp_path / "b")
    assert [r["step"] for r in out["log"]] == [1, 2, 3, 4]
    assert not (tmp_path / "b" / "checkpoint").exists()  # removed once the final policy is saved
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    # a finished run is not redone
    again = train_ppo(_tiny_policy(tiny_tok), tiny_tok, prompts, flaky, cfg, tmp_path / "b")
    assert again["steps"] == 4


def test_ppo_bad_inputs(tiny_tok, tmp_path):
    policy = _tiny_policy(tiny_tok)
    with pytest.raises(ValueError, match="no prompts"):
        train_ppo(policy, tiny_tok, [], _gold, _small_cfg(), tmp_path)
    with pytest.raises(ValueError, match="reward_fn returned shape"):
        train_ppo(
            policy, tiny_tok, ["\n\nHuman: hi\n\nAssistant:"], lambda p, r: [0.0, 1.0, 2.0], _small_cfg(), tmp_path
        )


def _bos_chat_tokenizer():
    """A tokenizer that adds BOS to every text it encodes with special tokens and whose chat template writes
    the BOS too (as Llama's), so a templated prompt encoded with special tokens again starts with two BOS."""
    from tokenizers import processors

    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.models import tiny_tokenizer

    template = (
        "<bos>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = tiny_tokenizer(synthetic_corpus(SyntheticConfig()), vocab_size=1000, chat_template=template)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


def test_ppo_encodes_chat_templated_prompts_as_generation_does(tmp_path, one_thread):
    """A prompt rendered by a chat template carries its own BOS: PPO encodes it without special tokens again
    (one BOS, the ids the candidates were sampled from, `encode_prompts`), and a plain prompt with them."""
    from pipeline.align.generate import encode_prompts

    tok = _bos_chat_tokenizer()
    bos = tok.bos_token_id
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue?"}], tokenize=False, add_generation_prompt=True
    )
    plain = "\n\nHuman: Is the sky blue?\n\nAssistant:"
    assert tok(templated)["input_ids"][:2] == [bos, bos]  # what encoding it with special tokens gives
    policy = _tiny_policy(tok)
    seen = []
    generate = policy.generate

    def spy(*args, **kw):
        seen.append([row[m.bool()].tolist() for row, m in zip(kw["input_ids"], kw["attention_mask"])])
        return generate(*args, **kw)

    policy.generate = spy
    cfg = _small_cfg(num_steps=1, rollout_batch_size=2, mini_batch_size=2, ppo_epochs=1)
    train_ppo(
        policy, tok, [templated, plain], lambda p, r: [0.0] * len(p), cfg, tmp_path, add_special_tokens=[False, True]
    )
    want = encode_prompts(tok, [templated, plain], cfg.max_prompt_length, [False, True])
    assert sorted(seen[0]) == sorted(want)
    assert all(ids[0] == bos and ids[1] != bos for ids in seen[0])  # exactly one BOS in front of each prompt
