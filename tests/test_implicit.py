"""Implicit reward models (`pipeline.implicit`): beta * (sum log pi(y|x) - sum log pi_ref(y|x)) over response tokens.

Pinned here: the tokenization rules (EOS appended to text responses, a BOS kept, templated rows untouched, the
response starting where prompt and prompt + response stop agreeing, the LEFT cut), exactness of the batched path
against a one-sequence-at-a-time float64 computation written independently below and against each sequence's own
fp32 forward (1e-6 per token), and equality with TRL 1.16's DPOTrainer on the same rows (its own code: the
trainer's dataset preparation, collator and `compute_loss`, per row).
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import pytest
import torch

from pipeline.implicit import (
    check_spec,
    encode_rows,
    implicit_rewards,
    load_implicit_rm,
    sequence_logprobs,
)


WORDS = "hello there how are you fine thanks go away the cat sat on a mat please help me now".split()


def random_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) text rows of varied lengths in the HH layout."""
    rng = np.random.default_rng(seed)

    def text(k):
        return " " + " ".join(rng.choice(WORDS, int(k)))

    return [
        (
            "\n\nHuman:" + text(rng.integers(1, 20)) + "\n\nAssistant:",
            text(rng.integers(1, 30)),
            text(rng.integers(1, 30)),
        )
        for _ in range(n)
    ]


def bos_tokenizer(tok):
    """`tok` with a post-processor that puts <bos> before every text (a Llama-style tokenizer)."""
    from tokenizers import processors

    out = copy.deepcopy(tok)
    bos = out.bos_token_id
    out._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert out("hi")["input_ids"][0] == bos
    return out


def lm(tok, arch: str, seed: int):
    """A tiny random causal LM whose next-token distributions are not flat (the LM head scaled up)."""
    from pipeline.models import TinyModelSpec, tiny_model

    model = tiny_model(TinyModelSpec(arch=arch, size="tiny"), tok, task="causal_lm", seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5.0)
    return model.eval()


def float64_logprob(model64, ids: list[int], first: int) -> float:
    """sum_{t >= first} log p(ids[t] | ids[:t]): one sequence alone, float64, the log-softmax written out."""
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(max(first, 1), len(ids)):
        row = logits[t - 1]
        total += float(row[ids[t]] - row.max() - torch.log(torch.exp(row - row.max()).sum()))
    return total


def n_scored(ids, starts) -> np.ndarray:
    return np.array([max(len(s) - max(st, 1), 1) for s, st in zip(ids, starts)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Tokens


def test_text_rows_get_an_eos_and_the_response_starts_after_the_prompt(tiny_tok):
    prompt, response = "\n\nHuman: hello there\n\nAssistant:", " fine thanks"
    (ids,), (start,), (cut,) = encode_rows(tiny_tok, [(prompt, response)])
    p = tiny_tok(prompt, add_special_tokens=False)["input_ids"]
    r = tiny_tok(prompt + response, add_special_tokens=False)["input_ids"]
    assert ids == r + [tiny_tok.eos_token_id] and start == len(p) and not cut
    assert ids[start:][-1] == tiny_tok.eos_token_id  # the EOS is a response token (TRL scores it too)
    # a response already ending with the EOS text gets no second one
    (again,), _, _ = encode_rows(tiny_tok, [(prompt, response + tiny_tok.eos_token)])
    assert again == ids


def test_a_bos_is_kept_and_the_cut_is_from_the_left(tiny_tok):
    tok = bos_tokenizer(tiny_tok)
    prompt, response = "\n\nHuman: hello there how are you\n\nAssistant:", " fine thanks"
    (full,), (start,), _ = encode_rows(tok, [(prompt, response)])
    assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
    n_resp = len(full) - start
    limit = n_resp + 4  # room for the BOS, 3 prompt tokens and the whole response
    (ids,), (s,), (cut,) = encode_rows(tok, [(prompt, response)], limit)
    assert cut and len(ids) == limit and ids[0] == tok.bos_token_id
    assert ids[1:] == full[len(full) - (limit - 1) :] and ids[s:] == full[start:]  # the response survives whole
    # a limit below the response: only its last tokens are left, all of them response tokens
    (ids,), (s,), _ = encode_rows(tok, [(prompt, response)], 3)
    assert ids == [tok.bos_token_id, *full[-2:]] and s == 1
    with pytest.raises(ValueError, match="at least 2 tokens"):
        encode_rows(tok, [(prompt, response)], 1)


def test_templated_rows_get_nothing_added(chat_tok):
    from pipeline.data.render import templated_pair

    conv = [{"role": "user", "content": "hello there"}]
    p, c, _ = templated_pair(
        chat_tok, conv, [{"role": "assistant", "content": "fine"}], [{"role": "assistant", "content": "no"}]
    )
    (ids,), (start,), _ = encode_rows(chat_tok, [(p, c)], templated=True)
    assert ids == chat_tok(p + c, add_special_tokens=False)["input_ids"]
    assert chat_tok.decode(ids[start:]).startswith("fine<|im_end|>") and ids[-1] != chat_tok.eos_token_id


# --------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_batched_log_probs_equal_each_sequence_alone(tiny_tok, arch, one_thread):
    """Right-padded batches of mixed lengths (with a left cut on some rows) vs a float64 forward of every sequence
    alone and vs its own fp32 forward: within 1e-6 per scored token (measured: <= 2.1e-7 vs float64, 0 vs the
    sequence's own fp32 forward with 1 thread, <= 9e-8 with 2)."""
    tok = bos_tokenizer(tiny_tok) if arch == "llama" else tiny_tok
    model = lm(tok, arch, seed=1)
    rows = [(p, c) for p, c, _ in random_rows(12)]
    ids, starts, cut = encode_rows(tok, rows, max_length=40)
    assert any(cut) and not all(cut)
    n = n_scored(ids, starts)
    batched = sequence_logprobs(model, ids, starts, batch_size=5, max_tokens_per_batch=150)
    alone = sequence_logprobs(model, ids, starts, batch_size=1)
    model64 = copy.deepcopy(model).double()
    exact = np.array([float64_logprob(model64, s, st) for s, st in zip(ids, starts)])
    assert np.max(np.abs(batched - exact) / n) < 1e-6
    assert np.max(np.abs(alone - exact) / n) < 1e-6
    assert np.max(np.abs(batched - alone) / n) < 1e-6
    assert np.ptp(exact / n) > 0.1  # the sums are not all alike
    # the float64 model through the same batched path: exact to float64 rounding
    assert np.max(np.abs(sequence_logprobs(model64, ids, starts, batch_size=5) - exact)) < 1e-9


def test_implicit_rewards_are_beta_times_the_log_ratio(tiny_tok, one_thread):
    policy, reference = lm(tiny_tok, "llama", 1), lm(tiny_tok, "llama", 2)
    rows = [(p, c) for p, c, _ in random_rows(6, seed=3)]
    ids, starts, _ = encode_rows(tiny_tok, rows)
    lp = sequence_logprobs(policy, ids, starts, batch_size=1)
    lr = sequence_logprobs(reference, ids, starts, batch_size=1)
    got = implicit_rewards(policy, reference, tiny_tok, rows, 0.25, batch_size=4)
    assert isinstance(got, list) and len(got) == len(rows)
    np.testing.assert_allclose(got, 0.25 * (lp - lr), atol=1e-6 * n_scored(ids, starts).max())
    free = implicit_rewards(policy, None, tiny_tok, rows, 0.25, batch_size=4)  # reference-free: beta * log pi
    np.testing.assert_allclose(free, 0.25 * lp, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Loading


def test_load_implicit_rm_round_trip_and_clear_errors(tiny_tok, tmp_path, one_thread):
    from pipeline.models import ModelLoadError

    policy, reference = lm(tiny_tok, "gpt_neox", 1), lm(tiny_tok, "gpt_neox", 2)
    policy.save_pretrained(tmp_path / "policy")
    tiny_tok.save_pretrained(tmp_path / "policy")
    reference.save_pretrained(tmp_path / "ref")  # the reference needs no tokenizer of its own
    spec = {"policy": str(tmp_path / "policy"), "reference": str(tmp_path / "ref"), "beta": 0.1}
    pol, ref, tok, beta = load_implicit_rm(spec)
    rows = [(p, c) for p, c, _ in random_rows(3)]
    np.testing.assert_allclose(
        implicit_rewards(pol, ref, tok, rows, beta),
        implicit_rewards(policy, reference, tiny_tok, rows, 0.1),
        atol=1e-6,
    )
    _, none, _, _ = load_implicit_rm(
        {"policy": spec["policy"], "reference": None, "beta": 0.1, "reference_free": True}
    )
    assert none is None
    with pytest.raises(ValueError, match=r"x.reference: missing.*or set x.reference_free=true"):
        check_spec({"policy": "p", "beta": 0.1}, "x")
    with pytest.raises(ValueError, match="both set"):
        check_spec({"policy": "p", "reference": "r", "beta": 0.1, "reference_free": True}, "x")
    with pytest.raises(ValueError, match=r"x.beta = 0: must be a finite number > 0"):
        check_spec({"policy": "p", "reference": "r", "beta": 0}, "x")
    # a sequence classifier is no causal LM: refused naming the key
    from tests.helpers import save_tiny_rm

    save_tiny_rm(tiny_tok, tmp_path / "rm", seed=1, head_scale=1.0)
    with pytest.raises(
        ModelLoadError, match=r"x.reference: .*rm is a GPTNeoXForSequenceClassification checkpoint, not a causal"
    ):
        load_implicit_rm({**spec, "reference": str(tmp_path / "rm")}, key="x")
    # another vocabulary than the policy's
    from pipeline.models import tiny_tokenizer

    other = tiny_tokenizer(["some other corpus entirely"] * 20, vocab_size=300)
    lm(other, "gpt_neox", 3).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"x.reference: its vocabulary \(\d+ ids\) is not the policy's"):
        load_implicit_rm({**spec, "reference": str(tmp_path / "other")}, key="x")


# --------------------------------------------------------------------------------------------------
# TRL 1.16's DPOTrainer, per row


def trl_rewards(policy, reference, tok, rows, beta, **config):
    """Per-row (rewards/chosen, rewards/rejected) from TRL's DPOTrainer: its own dataset preparation (EOS appended,
    tokenized prompt and completions), collator (truncation) and `compute_loss`, one row per batch, so each logged
    batch MEAN is that row's value. Also returns the trainer (its prepared dataset)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=beta,
        loss_type=["sigmoid"],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        report_to="none",
        per_device_train_batch_size=1,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        **config,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.eval()
    out = []
    for i in range(len(trainer.train_dataset)):
        trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]]))
        m = trainer._metrics["eval"]
        out.append((m["rewards/chosen"][-1], m["rewards/rejected"][-1]))
    return np.array(out), trainer


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_equal_to_trl_dpo_trainer_per_row(tiny_tok, arch, one_thread):
    """rewards/chosen and rewards/rejected of TRL's DPOTrainer (loss_type sigmoid, reverse KL, ld_alpha None, no
    truncation) equal `implicit_rewards` per row. Llama with a BOS-adding tokenizer (TRL tokenizes the prompt and
    prompt + completion with special tokens), GPT-NeoX without. Tolerance: 2e-6 per response token, because TRL's
    own computation is fp32 throughout (its chunked log-prob kernel casts to fp32): against the exact float64 value
    its rewards here are off by up to 1.04e-6 per token, ours (fp32) by <= 1.8e-7; measured |ours - TRL| <= 9.9e-7
    per token (2026-12-07, 1 thread).
    """
    tok = bos_tokenizer(tiny_tok) if arch == "llama" else tiny_tok
    policy, reference = lm(tok, arch, 1), lm(tok, arch, 2)
    rows = random_rows(12, seed=1)
    beta = 0.1
    trl, trainer = trl_rewards(policy, reference, tok, rows, beta, max_length=None)
    # TRL's conventions, pinned (they are not all ours): EOS appended to text completions, a BOS before the prompt
    first = trainer.train_dataset[0]
    assert first["chosen"].endswith(tok.eos_token) and first["chosen_ids"][-1] == tok.eos_token_id
    assert (first["prompt_ids"][0] == tok.bos_token_id) == (arch == "llama")
    for col, side in ((0, 1), (1, 2)):
        side_rows = [(r[0], r[side]) for r in rows]
        ours = np.array(implicit_rewards(policy, reference, tok, side_rows, beta, batch_size=5))
        ids, starts, _ = encode_rows(tok, side_rows)
        key = "chosen_ids" if side == 1 else "rejected_ids"
        assert [s[st:] for s, st in zip(ids, starts)] == [trainer.train_dataset[i][key] for i in range(len(rows))]
        per_token = np.abs(ours - trl[:, col]) / beta / n_scored(ids, starts)
        assert per_token.max() < 2e-6, per_token.max()
    # TRL's precomputed reference side (`compute_ref_log_probs`) is the reference sum, per row
    _, pre = trl_rewards(policy, reference, tok, rows[:4], beta, max_length=None, precompute_ref_log_probs=True)
    ids, starts, _ = encode_rows(tok, [(r[0], r[1]) for r in rows[:4]])
    ref_sum = sequence_logprobs(reference, ids, starts)
    assert np.max(np.abs(np.array(pre.train_dataset["ref_chosen_logps"]) - ref_sum) / n_scored(ids, starts)) < 2e-6


def test_equal_to_trl_on_conversational_rows_under_the_policys_chat_template(chat_tok, one_thread):
    """Conversational rows: TRL applies the chat template (tokenized, no EOS appended; the completion after the
    generation prompt); the implicit RMs render the same rows with `pipeline.data.render.templated_pair` under the
    policy's tokenizer and score them as templated rows: equal per row, the end-of-turn marker included."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.data.render import templated_pair

    policy, reference = lm(chat_tok, "llama", 1), lm(chat_tok, "llama", 2)
    rows = [
        ([{"role": "user", "content": p.split("Human:")[1].split("\n\nAssistant:")[0].strip()}], c.strip(), r.strip())
        for p, c, r in random_rows(6, seed=4)
    ]
    ds = Dataset.from_list(
        [
            {
                "prompt": p,
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }
            for p, c, r in rows
        ]
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        beta=0.1,
        loss_type=["sigmoid"],
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=1,
        max_length=None,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=chat_tok)
    trainer.model.eval()
    trl = []
    for i in range(len(rows)):
        trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]]))
        trl.append(trainer._metrics["eval"]["rewards/chosen"][-1])
    rendered = [
        templated_pair(chat_tok, p, [{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}])
        for p, c, r in rows
    ]
    side = [(t[0], t[1]) for t in rendered]
    ids, starts, _ = encode_rows(chat_tok, side, templated=True)
    assert [s[st:] for s, st in zip(ids, starts)] == [trainer.train_dataset[i]["chosen_ids"] for i in range(len(rows))]
    ours = np.array(implicit_rewards(policy, reference, chat_tok, side, 0.1, templated=True, batch_size=3))
    assert np.max(np.abs(ours - np.array(trl)) / 0.1 / n_scored(ids, starts)) < 2e-6


def test_truncation_trl_keeps_the_start_ours_cuts_from_the_left(tiny_tok, one_thread):
    """TRL's default truncation_mode keep_start cuts the END of prompt + completion (the response's tail is lost);
    the implicit RMs cut from the LEFT, which is TRL's keep_end for a tokenizer without a BOS: equal per row."""
    policy, reference = lm(tiny_tok, "gpt_neox", 1), lm(tiny_tok, "gpt_neox", 2)
    rows = random_rows(6, seed=2)
    limit = 24
    keep_end, _ = trl_rewards(policy, reference, tiny_tok, rows, 0.1, max_length=limit, truncation_mode="keep_end")
    keep_start, trainer = trl_rewards(policy, reference, tiny_tok, rows, 0.1, max_length=limit)
    ours = np.array(implicit_rewards(policy, reference, tiny_tok, [(p, c) for p, c, _ in rows], 0.1, max_length=limit))
    ids, starts, cut = encode_rows(tiny_tok, [(p, c) for p, c, _ in rows], limit)
    assert any(cut)
    assert np.max(np.abs(ours - keep_end[:, 0]) / 0.1 / n_scored(ids, starts)) < 2e-6
    assert np.max(np.abs(ours - keep_start[:, 0])) > 1e-3  # not TRL's default
    batch = trainer.data_collator([trainer.train_dataset[0]])
    row = trainer.train_dataset[0]
    assert batch["input_ids"].shape[1] <= limit
    assert batch["input_ids"][0].tolist()[: min(limit, len(row["prompt_ids"]))] == row["prompt_ids"][:limit]
