"""Tiny data, tokenizer and model builders for the reward-trainer tests (no data layer, no hub)."""

from __future__ import annotations

import random

from datasets import Dataset

from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer


SOURCES = ["helpful", "harmless", "webgpt"]
WORDS = "yes no maybe sure refuse answer the a cat dog red blue one two three four paris rome".split()


def balanced_pairs(n_blocks: int = 8, per_source: int = 2, seed: int = 0) -> Dataset:
    """Rows in balanced blocks: every consecutive len(SOURCES)*per_source rows hold per_source per source.

    Each source prefers a different word, so the sources disagree (MORE has something to weigh).
    """
    rng = random.Random(seed)
    liked = {"helpful": "sure", "harmless": "refuse", "webgpt": "answer"}
    rows = []
    for _ in range(n_blocks):
        for sid, src in enumerate(SOURCES):
            for _ in range(per_source):
                q = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
                filler = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
                rows.append(
                    {
                        "prompt": f"\n\nHuman: {q}?\n\nAssistant:",
                        "chosen": f" {liked[src]} {filler}",
                        "rejected": f" {filler}",
                        "source": src,
                        "source_id": sid,
                    }
                )
    return Dataset.from_list(rows)


def tokenizer():
    ds = balanced_pairs(20)
    return tiny_tokenizer([p + c for p, c in zip(ds["prompt"], ds["chosen"])], vocab_size=300)


def model(arch: str = "gpt_neox", tok=None, seed: int = 0):
    return tiny_model(TinyModelSpec(arch=arch, size="tiny"), tok or tokenizer(), task="reward", seed=seed)


def config(tmp_path, method: str = "more", **kw):
    from pipeline.reward.trainer import MORERewardConfig

    base = dict(
        output_dir=str(tmp_path),
        method=method,
        source_names=SOURCES,
        balanced_batches=True,
        per_device_train_batch_size=2 * len(SOURCES),
        max_steps=6,
        learning_rate=5e-3,
        logging_steps=1,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        max_length=64,
        disable_tqdm=True,
    )
    base.update(kw)
    return MORERewardConfig(**base)
