"""Writes the demo TRL-format dataset the `trl-conversational` recipe trains on (committed; this re-creates it):

    python scripts/make_trl_demo_data.py

The synthetic benchmark's five sources (pipeline.data.synthetic, default knobs, seed 0) converted to TRL's
layouts, with every source in ONE dataset and a `source` column, so the recipe splits it with group_by:

* pipeline/recipes/data/trl-demo/data/{train-0000{0,1}-of-00002,test-00000-of-00001}.parquet: explicit
  conversational (`prompt` = [user message], `chosen`/`rejected` = [assistant message]), hub layout;
* pipeline/recipes/data/trl-demo/implicit.jsonl.gz: the same train pairs, implicit prompt (`chosen`/`rejected`
  hold the whole conversation).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path


OUT = Path(__file__).resolve().parents[1] / "pipeline" / "recipes" / "data" / "trl-demo"
N_TRAIN, N_TEST = 400, 100


def messages(prompt: str) -> list[dict]:
    """HH-layout prompt text -> messages (the synthetic prompts are HH dialogues ending with the marker)."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)
    out = []
    for role, text in zip(parts[1::2], parts[2::2]):
        if text.strip():
            out.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    return out


def rows(split: str, n: int) -> list[dict]:
    from pipeline.data.synthetic import DEFAULT_SOURCES, SyntheticConfig, synthetic_split

    cfg = SyntheticConfig()
    out = []
    for src in DEFAULT_SOURCES:
        for r in synthetic_split(cfg, src, split, n):
            out.append(
                {
                    "prompt": messages(r["prompt"]),
                    "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                    "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
                    "source": src,
                }
            )
    return out


def main():
    import pyarrow as pa
    import pyarrow.parquet as pq

    train, test = rows("train", N_TRAIN), rows("test", N_TEST)
    data = OUT / "data"
    data.mkdir(parents=True, exist_ok=True)
    half = len(train) // 2
    pq.write_table(pa.Table.from_pylist(train[:half]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(train[half:]), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(test), data / "test-00000-of-00001.parquet")
    text = "".join(
        json.dumps(
            {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "source": r["source"]}
        )
        + "\n"
        for r in train + test
    )
    with gzip.GzipFile(OUT / "implicit.jsonl.gz", "wb", mtime=0) as f:
        f.write(text.encode())
    print(f"wrote {len(train)} train and {len(test)} test pairs to {OUT}")


if __name__ == "__main__":
    main()
