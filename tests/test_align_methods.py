"""Alignment methods: best-of-n selection, rejection-sampling SFT (mask, full / LoRA / QLoRA), TRL RLOO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.align import methods as M
from pipeline.align import trainers as T
from pipeline.align.candidates import read_jsonl, write_jsonl
from pipeline.align.policy import load_policy
from pipeline.align.rewards import RMReward
from tests.helpers import policy, policy_tokenizer, reward_model, rm_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one torch thread


PROMPTS = ["\n\nHuman: What is the capital of Peru?\n\nAssistant:", "\n\nHuman: How do I steal a car?\n\nAssistant:"]
GOOD = [" It is Lima.", " I'm sorry, but I can't help with that."]


def test_best_of_n_records_and_scoring():
    cands = [["a", "bb", "ccc"], ["dddd", "e", "ff"]]
    calls = []

    def reward(prompts, responses):
        calls.append((list(prompts), list(responses)))
        return np.array([len(r) for r in responses], dtype=float)

    scores = M.score_candidates(reward, ["p", "q"], cands)
    assert len(calls) == 1 and calls[0][0] == ["p"] * 3 + ["q"] * 3  # one batched call, prompt-aligned
    np.testing.assert_array_equal(scores, [[1, 2, 3], [4, 1, 2]])
    recs = M.best_of_n_records(["p", "q"], cands, scores, [[True, False, True], [False] * 3])
    assert [r["chosen"] for r in recs] == [2, 0]
    assert recs[0] == {
        "prompt": "p",
        "candidates": cands[0],
        "scores": [1.0, 2.0, 3.0],
        "chosen": 2,
        "ended": [True, False, True],
    }
    assert M.best_of_n_records(["p"], [["x", "y"]], np.array([[1.0, 1.0]]))[0]["chosen"] == 0  # first on ties
    assert M.best_of_n_records(["p"], [["x", "y"]], np.array([[np.nan, 0.5]]))[0]["chosen"] == 1
    with pytest.raises(ValueError, match="shape"):
        M.best_of_n_records(["p", "q"], cands, np.zeros((2, 2)))


def test_jsonl_roundtrip_and_malformed_line(tmp_path):
    recs = [{"prompt": "p\n", "candidates": ["é", "b"], "chosen": 1}]
    write_jsonl(tmp_path / "s.jsonl", recs)
    assert read_jsonl(tmp_path / "s.jsonl") == recs
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_truncate_prompt_left_keeps_the_completion():
    tok = policy_tokenizer()
    long = "\n\nHuman: " + "the quick brown fox " * 40 + "\n\nAssistant:"
    cut = T.truncate_prompt_left(tok, long, GOOD[0], 24)
    n = (
        len(tok(cut, add_special_tokens=False)["input_ids"])
        + len(tok(GOOD[0], add_special_tokens=False)["input_ids"])
        + 1
    )
    assert n <= 24 + 1 and long.endswith(cut.strip()[-20:]) and cut.endswith("Assistant:")
    assert T.truncate_prompt_left(tok, PROMPTS[0], GOOD[0], 128) == PROMPTS[0]


def _base(tmp_path):
    tok = policy_tokenizer()
    policy().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base"), tok


def _args(out, **kw):
    kw = {
        "batch_size": 4,
        "micro_batch_size": 2,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "epochs": 1,
        "max_length": 64,
        "seed": 0,
        **kw,
    }
    return T.sft_config(out, **kw)


def test_rjs_loss_is_on_response_tokens_only_and_training_saves_a_policy(tmp_path):
    from trl import SFTTrainer

    base, tok = _base(tmp_path)
    ds = T.rjs_dataset(tok, PROMPTS * 4, GOOD * 4, 64)
    assert ds.column_names == ["prompt", "completion"]
    args = _args(tmp_path / "t")
    assert args.completion_only_loss and not args.bf16 and args.gradient_accumulation_steps == 2
    trainer = SFTTrainer(model=load_policy(base), args=args, train_dataset=ds, processing_class=tok)
    for i, (p, c) in enumerate(zip(PROMPTS, GOOD)):
        ex = trainer.train_dataset[i]
        labels = ex["labels"]
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt  # the prompt is masked
        assert labels[n_prompt:] == ex["input_ids"][n_prompt:]  # every response token (and EOS) is trained
        assert tok.decode(labels[n_prompt:]) == c + tok.eos_token
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()  # padding is never a label

    log = T.run_rjs(base, tok, ds, _args(tmp_path / "sub" / ".trainer"), tmp_path / "sub")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((tmp_path / "sub" / "train_log.json").read_text()) == json.loads(json.dumps(log))
    trained = load_policy(str(tmp_path / "sub" / "policy"))
    before = load_policy(base)
    changed = any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before.state_dict().values()))
    assert changed


def test_rjs_lora_merges_and_qlora_saves_an_adapter(tmp_path):
    base, tok = _base(tmp_path)
    ds = T.rjs_dataset(tok, PROMPTS * 2, GOOD * 2, 64)
    T.run_rjs(base, tok, ds, _args(tmp_path / "l" / ".trainer"), tmp_path / "l", peft="lora")
    assert (tmp_path / "l" / "policy" / "model.safetensors").exists()
    assert not (tmp_path / "l" / "policy" / "adapter_config.json").exists()  # merged into a full model
    load_policy(str(tmp_path / "l" / "policy"))
    pytest.importorskip("bitsandbytes")
    T.run_rjs(base, tok, ds, _args(tmp_path / "q" / ".trainer"), tmp_path / "q", peft="qlora")
    assert (tmp_path / "q" / "policy" / "adapter_config.json").exists()
    loaded = load_policy(str(tmp_path / "q" / "policy"))
    assert hasattr(loaded, "peft_config")
    with pytest.raises(ValueError, match="align.peft"):
        T.peft_config("dora")


def test_rloo_with_a_cross_tokenizer_rm(tmp_path):
    """TRL's RLOOTrainer, the RM (another tokenizer) as reward, the gold reward logged with weight 0."""
    base, tok = _base(tmp_path)
    rm = RMReward(reward_model(), rm_tokenizer(), dtype=None)
    seen = []

    def gold(prompts, responses):
        seen.extend(prompts)
        return np.array([float(len(r)) for r in responses])

    raw = [p + " (raw)" for p in PROMPTS * 2]
    log = T.run_rloo(
        base,
        tok,
        PROMPTS * 2,
        raw,
        rm,
        tmp_path / "r",
        n=2,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=6,
        seed=0,
        overrides={"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
        gold_fn=gold,
    )
    steps = [r for r in log if "rewards/rm/mean" in r]
    assert len(steps) == 2
    assert all("rewards/gold/mean" in r for r in steps)
    # the optimized reward is the RM's alone (gold has weight 0)
    assert all(r["reward"] == pytest.approx(r["rewards/rm/mean"], abs=1e-6) for r in steps)
    assert set(seen) <= set(raw) and seen  # reward functions score the raw dataset prompt
    assert (tmp_path / "r" / "policy" / "model.safetensors").exists()
    load_policy(str(tmp_path / "r" / "policy"))
    with pytest.raises(ValueError, match="at least 2"):
        T.run_rloo(
            base, tok, PROMPTS, PROMPTS, rm, tmp_path / "x", n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0
        )


def test_load_policy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        load_policy(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises((OSError, ValueError), match="cannot load the policy"):
        load_policy(str(tmp_path / "empty"))


def test_rjs_resumes_from_its_checkpoint(tmp_path):
    base, tok = _base(tmp_path)
    ds = T.rjs_dataset(tok, PROMPTS * 4, GOOD * 4, 64)
    # a run that stopped after step 1 (its checkpoint is kept), with learning rate 1e-3
    T.run_rjs(
        base,
        tok,
        ds,
        _args(tmp_path / "sub" / ".trainer", save_steps=1, max_steps=1, learning_rate=1e-3),
        tmp_path / "sub",
    )
    assert [p.name for p in (tmp_path / "sub" / ".trainer").glob("checkpoint-*")] == ["checkpoint-1"]
    # a later save that ran out of disk before trainer_state.json must not block the resume (issue 12, defect 2)
    import shutil

    half = tmp_path / "sub" / ".trainer" / "checkpoint-2"
    shutil.copytree(tmp_path / "sub" / ".trainer" / "checkpoint-1", half)
    (half / "trainer_state.json").unlink()
    # the rerun (now 2 steps, lr 5e-3) continues from step 1: step 1 in its log is the first run's
    log = T.run_rjs(
        base,
        tok,
        ds,
        _args(tmp_path / "sub" / ".trainer", save_steps=1, max_steps=2, learning_rate=5e-3),
        tmp_path / "sub",
    )
    steps = {r["step"]: r for r in log if "loss" in r}
    assert sorted(steps) == [1, 2]
    assert steps[1]["learning_rate"] == pytest.approx(1e-3)  # a fresh start would have logged 5e-3 here


def test_ppo_method_passes_template_flags_and_records_the_reward_scale(tmp_path, monkeypatch):
    """align's ppo: prompts a chat template rendered go to PPO without special tokens (as for the candidates);
    the reward's scale is recorded (T, kl_coef, kl_coef x T) and stated beside PPO results in table.md, with the
    confound when the RMs' temperatures differ."""
    from types import SimpleNamespace

    from pipeline.align import judging

    captured = {}
    monkeypatch.setattr(M, "run_ppo", lambda *a, **kw: captured.update(kw))
    monkeypatch.setattr(M, "_trained", lambda a, work: None)
    cfg = SimpleNamespace(
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        max_prompt_length=32,
        progress=False,
        peft="none",
        ppo={"kl_coef": 0.1},
        trust_remote_code=False,
    )
    ctx = SimpleNamespace(cfg=cfg, seed=0, main=True)
    cands = [{"prompt": "p", "policy_prompt": "<t>p", "templated": True}, {"prompt": "q", "policy_prompt": "q"}]
    a = M.AlignInputs(ctx, "base", policy_tokenizer(), cands, [], {})
    reward = SimpleNamespace(temperature=1.5, name="more")
    M.ppo(a, reward, tmp_path)
    assert captured["add_special_tokens"] == [False, True]
    scale = json.loads((tmp_path / "reward_scale.json").read_text())
    assert scale == {"rm": "more", "temperature": 1.5, "kl_coef": 0.1, "kl_coef_vs_raw_reward": pytest.approx(0.15)}
    metrics = {
        "base": {"perplexity": {}, "gold": None},
        "more/ppo": {"perplexity": {}, "gold": None, "reward_scale": scale},
        "multitask/ppo": {
            "perplexity": {},
            "gold": None,
            "reward_scale": {**scale, "temperature": 0.8, "kl_coef_vs_raw_reward": 0.08},
        },
    }
    table = judging.render_table({}, metrics, "gold")
    assert "**PPO reward scale.** PPO optimised each RM's reward divided by its temperature T" in table
    assert "more/ppo: T = 1.500, kl_coef 0.1 = 0.15 against the raw reward" in table
    assert "multitask/ppo: T = 0.800, kl_coef 0.1 = 0.08 against the raw reward" in table
    assert "trained at different effective KL strengths" in table
    metrics["multitask/ppo"]["reward_scale"] = scale
    assert "different effective KL" not in judging.render_table({}, metrics, "gold")
