"""A TRL user's port matches stock `trl.RewardTrainer`: over-length pairs are dropped as TRL drops them (in every
layout), `truncation="left"` keeps them cut from the left (in every layout alike), and with TRL's batch order
(`method="multitask"`, `length_grouping=False`, `balanced_batches=False`) the per-step training losses equal
stock TRL's. Data: 400 HH-RLHF pairs shipped in tests/fixtures (some longer than the max_length used here)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer
from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "data" / "hh-trl-400" / "train.jsonl.gz"
MAX_LENGTH = 384
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _rows() -> list[dict]:
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _split(text: str) -> tuple[str, str]:
    i = text.rindex("\n\nAssistant:") + len("\n\nAssistant:")
    return text[:i], text[i:]


def _turns(prompt: str) -> list[dict]:
    out = []
    for part in prompt.split("\n\n")[1:]:
        role, _, content = part.partition(":")
        if content.strip():
            out.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return out


@pytest.fixture(scope="module")
def tok():
    rows = _rows()
    return tiny_tokenizer(
        [r["chosen"] for r in rows] + [r["rejected"] for r in rows], vocab_size=600, chat_template=CHATML
    )


def layout(name: str, tok=None) -> Dataset:
    rows = _rows()
    if name == "implicit_text":
        return Dataset.from_list(rows)
    if name == "explicit_text":
        return Dataset.from_list(
            [
                {
                    "prompt": _split(r["chosen"])[0],
                    "chosen": _split(r["chosen"])[1],
                    "rejected": _split(r["rejected"])[1],
                }
                for r in rows
            ]
        )
    if name == "conversational":
        out = []
        for r in rows:
            p, c = _split(r["chosen"])
            rej = _split(r["rejected"])[1]
            prompt = _turns(p)
            if not prompt or prompt[-1]["role"] != "user":
                continue
            out.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": c.strip() or "."}],
                    "rejected": [{"role": "assistant", "content": rej.strip() or "."}],
                }
            )
        return Dataset.from_list(out)
    if name == "pretokenized":
        ids = lambda t: tok(t)["input_ids"] + [tok.eos_token_id]  # noqa: E731 - as TRL tokenizes a text
        return Dataset.from_list([{"chosen_ids": ids(r["chosen"]), "rejected_ids": ids(r["rejected"])} for r in rows])
    raise ValueError(name)


def _ours(model, tok, ds, tmp_path, **kw):
    cfg = MORERewardConfig(
        output_dir=str(tmp_path / "ours"),
        method="multitask",
        max_length=MAX_LENGTH,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        disable_tqdm=True,
        save_strategy="no",
        **kw,
    )
    return MORERewardTrainer(model, cfg, train_dataset=ds, processing_class=tok)


def _stock(model, tok, ds, tmp_path, **kw):
    cfg = RewardConfig(
        output_dir=str(tmp_path / "stock"),
        max_length=MAX_LENGTH,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
        save_strategy="no",
        **kw,
    )
    return RewardTrainer(model, cfg, train_dataset=ds, processing_class=tok)


@pytest.mark.parametrize("name", ["implicit_text", "explicit_text", "conversational", "pretokenized"])
def test_over_length_pairs_are_dropped_like_trl_and_kept_cut_with_truncation_left(tok, tmp_path, name):
    ds = layout(name, tok)
    model = tiny_model(TinyModelSpec(), tok, task="reward")
    stock = _stock(model, tok, ds, tmp_path)
    ours = _ours(model, tok, ds, tmp_path)
    n_stock = len(stock.train_dataset)
    assert 0 < n_stock < len(ds), "the fixture must have pairs over max_length and pairs within it"
    assert list(ours.train_dataset["chosen_ids"]) == list(stock.train_dataset["chosen_ids"])
    assert list(ours.train_dataset["rejected_ids"]) == list(stock.train_dataset["rejected_ids"])
    assert ours.n_dropped["train"] == len(ds) - n_stock

    left = _ours(model, tok, ds, tmp_path, truncation="left")
    assert len(left.train_dataset) == len(ds) and left.n_truncated["train"] == len(ds) - n_stock
    assert all(
        len(x) <= MAX_LENGTH for x in list(left.train_dataset["chosen_ids"]) + list(left.train_dataset["rejected_ids"])
    )
    kept = set(map(tuple, stock.train_dataset["chosen_ids"]))
    assert sum(tuple(x) in kept for x in left.train_dataset["chosen_ids"]) >= n_stock  # pairs that fit: unchanged
    cut = [c for c in left.train_dataset["chosen_ids"] if tuple(c) not in kept]
    if name != "conversational":  # the tail survives: each cut text still ends with its EOS
        assert all(c[-1] == tok.eos_token_id for c in cut)
    else:  # and a chat template's end-of-turn marker
        assert all(c[-2] == tok.convert_tokens_to_ids("<|im_end|>") for c in cut)


def _step_losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.slow
@pytest.mark.parametrize("with_source_id", [False, True])
def test_per_step_losses_equal_stock_trl_with_trls_batch_order(tok, tmp_path, with_source_id, one_thread):
    """60 steps on the 400 pairs (over-length ones included, dropped alike), model given as a folder path
    with a fresh reward head, our default packing on: our per-step loss equals stock TRL's within 1e-5 (with
    packing=False the losses are bit-identical; packing adds float rounding of ~1e-7 at this learning rate)."""
    base = tmp_path / "base"
    tiny_model(TinyModelSpec(arch="llama"), tok, task="causal_lm").save_pretrained(base)
    tok.save_pretrained(base)
    ds = layout("implicit_text")
    steps = dict(max_steps=60, per_device_train_batch_size=4, learning_rate=1e-4, logging_steps=1, seed=7)
    stock = _step_losses(_stock(str(base), tok, ds, tmp_path, **steps))
    ours_ds = ds.add_column("source_id", [i % 2 for i in range(len(ds))]) if with_source_id else ds
    extra = {"source_names": ["a", "b"]} if with_source_id else {}
    ours = _step_losses(
        _ours(str(base), tok, ours_ds, tmp_path, length_grouping=False, balanced_batches=False, **steps, **extra)
    )
    assert len(ours) == len(stock) == 60
    worst = max(abs(a - b) for a, b in zip(ours, stock))
    assert worst < 1e-5, f"largest per-step loss difference {worst:.2e}"
