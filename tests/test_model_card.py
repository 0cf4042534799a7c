"""The model card written beside every RM says how to score a text: its code, run as written on
`prompt + response`, gives the pipeline's own reward (`pipeline.scoring.score_pairs`, fp32), for a decoder
tokenizer that gets an EOS appended, a BERT-style tokenizer ([CLS]/[SEP]) and an RM that pads with its EOS,
on pairs within and beyond max_length (cut from the left). `model(**tok(text))` does not."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import processors
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer
from pipeline.scoring import score_pairs


MAX_LENGTH = 24
PROMPTS = ["\n\nHuman: is paris in france?\n\nAssistant:", "\n\nHuman: " + "tell me more " * 12 + "\n\nAssistant:"]
CHOSEN = [" yes, paris is the capital of france", " sure: one two three"]
REJECTED = [" no", " i refuse to answer that question at all, sorry"]


def _tokenizer(kind: str):
    tok = tiny_tokenizer(PROMPTS + CHOSEN + REJECTED + ["hello world"] * 5, vocab_size=300)
    if kind == "bert":  # [CLS] text [SEP]: the tokenizer's own affixes, no EOS appended
        cls, sep = tok.bos_token_id, tok.eos_token_id
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A {tok.eos_token}", special_tokens=[(tok.bos_token, cls), (tok.eos_token, sep)]
        )
    if kind == "eos_pad":  # a Llama-style RM whose tokenizer pads with EOS
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("kind,arch", [("decoder", "llama"), ("bert", "bert"), ("eos_pad", "llama")])
def test_the_model_card_snippet_gives_the_pipelines_rewards(tmp_path, kind, arch):
    tok = _tokenizer(kind)
    model = tiny_model(TinyModelSpec(arch=arch), tok, task="reward", seed=3)
    if kind == "eos_pad":
        model.config.pad_token_id = tok.eos_token_id
    cfg = MORERewardConfig(
        output_dir=str(tmp_path / "out"),
        method="multitask",
        max_length=MAX_LENGTH,
        truncation="left",
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    ds = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = MORERewardTrainer(model, cfg, train_dataset=ds, processing_class=tok)
    rm_dir = tmp_path / "rm"
    trainer.save_with_card(rm_dir)
    tok.save_pretrained(rm_dir)
    card = (rm_dir / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('path = "."', f"path = {str(rm_dir)!r}")
    namespace: dict = {}
    exec(compile(code, "model card", "exec"), namespace)  # noqa: S102 - the card's own snippet, as a user runs it
    reward = namespace["reward"]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    rc, rr = score_pairs(rm, rm_tok, PROMPTS, CHOSEN, REJECTED, max_length=MAX_LENGTH, dtype=None)
    snippet_c = [reward(p + c) for p, c in zip(PROMPTS, CHOSEN)]
    snippet_r = [reward(p + r) for p, r in zip(PROMPTS, REJECTED)]
    np.testing.assert_allclose(snippet_c, rc, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(snippet_r, rr, atol=1e-5, rtol=1e-5)
    assert len(rm_tok(PROMPTS[1] + REJECTED[1])["input_ids"]) > MAX_LENGTH  # one pair is cut from the left
    if kind != "bert":  # the naive read-out skips the EOS (and the cut): other numbers
        with torch.no_grad():
            naive = [rm(**rm_tok(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(PROMPTS, CHOSEN)]
        assert not np.allclose(naive, rc, atol=1e-4)
