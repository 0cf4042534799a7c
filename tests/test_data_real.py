"""Loaders on the real slices in <repo>/../shared/data/real (skipped when the folder is absent)."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from pipeline.data import load_source, load_stats, tokenize_pairs
from pipeline.data.tokenize import encode_left


pytestmark = pytest.mark.real_data


def test_harmless_raw_and_more_json_agree_pair_for_pair(real_data_dir):
    d = real_data_dir / "hh-rlhf-harmless"
    raw = load_source("hh-rlhf", str(d), split="test", data_dir="harmless-base")
    more = load_source("more-json", str(d / "harmless.test.json"))
    assert len(raw) == len(more) == 2312 - 5
    assert load_stats(raw)["context_mismatch"] == load_stats(more)["context_mismatch"] == 5
    for col in ("prompt", "chosen", "rejected"):
        assert raw[col] == more[col]
    # the "common" rule keeps the 5 pairs, again identically in both layouts
    raw_c = load_source("hh-rlhf", str(d / "harmless-base/test.jsonl.gz"), context_mismatch="common")
    more_c = load_source("more-json", str(d / "harmless.test.json"), context_mismatch="common")
    assert len(raw_c) == 2312 and raw_c["chosen"] == more_c["chosen"] and raw_c["prompt"] == more_c["prompt"]
    # independent check: prompt + chosen reproduces every raw transcript that was kept
    recs = [json.loads(l) for l in gzip.open(d / "harmless-base/test.jsonl.gz", "rt")]
    kept = {r["chosen"] for r in recs}
    assert all(p + c in kept for p, c in zip(raw["prompt"], raw["chosen"]))


def test_helpful_more_json(real_data_dir):
    path = real_data_dir / "hh-rlhf-helpful/helpful.test.json"
    ds = load_source("more-json", str(path))
    recs = json.loads(path.read_text())
    st = load_stats(ds)
    assert st["records"] == 2352 and st.get("ties", 0) == 0
    assert len(ds) == 2352 - st.get("context_mismatch", 0)
    firsts = {r["text"][0] for r in recs}  # score is always [1, 0]: the first text is chosen
    assert all(p + c in firsts for p, c in zip(ds["prompt"], ds["chosen"]))


def test_webgpt_ties_and_order(real_data_dir):
    path = real_data_dir / "webgpt/webgpt.test.json"
    ds = load_source("more-json", str(path))
    assert load_stats(ds)["ties"] == 245 and len(ds) == 901 - 245
    recs = [r for r in json.loads(path.read_text()) if r["score"][0] != r["score"][1]]
    better = [r["text"][0] if r["score"][0] > r["score"][1] else r["text"][1] for r in recs]
    assert [p + c for p, c in zip(ds["prompt"], ds["chosen"])] == better
    assert sum(r["score"][1] > r["score"][0] for r in recs) == 308  # the better answer comes second
    assert all(p.startswith("## Human:\n") and p.endswith("## Assistant:\n") for p in ds["prompt"])


def _brute_force_oasst(path):
    """Independent reference: flatten every tree, then pair ranked assistant siblings under clean parents."""
    msgs = {}

    def flatten(m, parent):
        msgs[m["message_id"]] = dict(m, parent=parent)
        for r in m.get("replies", []):
            flatten(r, m["message_id"])

    for line in open(path):
        flatten(json.loads(line)["prompt"], None)

    def clean_path(mid):
        while mid is not None:
            if msgs[mid]["deleted"] or msgs[mid]["synthetic"]:
                return False
            mid = msgs[mid]["parent"]
        return True

    def history(mid):
        turns = []
        while mid is not None:
            turns.append(msgs[mid]["text"].strip())
            mid = msgs[mid]["parent"]
        return turns[::-1]

    groups = {}
    for m in msgs.values():
        if m["role"] == "assistant" and m.get("rank") is not None and clean_path(m["message_id"]):
            groups.setdefault(m["parent"], []).append(m)
    pairs = Counter()
    for parent, sib in groups.items():
        for a in sib:
            for b in sib:
                if a["rank"] < b["rank"]:
                    pairs[(tuple(history(parent)), a["text"].strip(), b["text"].strip())] += 1
    return pairs


def test_oasst1_pairs_match_brute_force(real_data_dir):
    path = real_data_dir / "oasst1/en_100_tree.jsonl"
    ds = load_source("oasst1", str(path))
    ref = _brute_force_oasst(path)
    assert sum(ref.values()) == len(ds) == 732  # 754 derivable pairs minus those inside synthetic trees

    def turns(prompt):
        out = []
        for chunk in prompt.split("\n\nHuman: ")[1:]:
            out += [t.strip() for t in chunk.split("\n\nAssistant:") if t.strip()]
        return tuple(out)

    got = Counter((turns(r["prompt"]), r["chosen"].strip(), r["rejected"].strip()) for r in ds)
    assert got == ref
    st = load_stats(ds)
    assert st["trees"] == 100 and st["skipped_messages"] == 22  # the 22 synthetic messages


def test_summarize_raw_batches(real_data_dir):
    d = real_data_dir / "summarize-from-feedback/comparisons"
    ds = load_source("summarize", str(d / "batch13.json"))  # JSON lines despite the extension
    assert len(ds) == 1097
    recs = [json.loads(l) for l in open(d / "batch13.json")]
    assert ds["chosen"] == [" " + r["summaries"][r["choice"]]["text"].strip() for r in recs]
    assert all(r["info"]["title"].strip() in p for r, p in zip(recs, ds["prompt"]))
    edit = load_source("summarize", str(d / "edit_b2_eval_test.json"))
    subs = [json.loads(l)["info"]["subreddit"] for l in open(d / "edit_b2_eval_test.json")]
    assert len(edit) == 5 and all(s.startswith("r/") for s in subs)  # the quirk: an "r/" prefix
    assert all(f"SUBREDDIT: {s}\n" in p and "r/r/" not in p for s, p in zip(subs, edit["prompt"]))
    both = load_source("summarize", str(d))
    assert len(both) == 1102
    assert len(load_source("summarize", str(d), record_splits=["valid1"])) == 265 + 1


def test_real_pairs_truncate_from_the_left(real_data_dir, tiny_tok):
    ds = load_source("more-json", str(real_data_dir / "webgpt/webgpt.test.json")).select(range(200))
    tok, n_cut = tokenize_pairs(ds, tiny_tok, max_length=128)
    full_c, _ = encode_left(tiny_tok, [p + c for p, c in zip(ds["prompt"], ds["chosen"])], None)
    full_r, _ = encode_left(tiny_tok, [p + c for p, c in zip(ds["prompt"], ds["rejected"])], None)
    assert n_cut == sum(len(a) > 128 or len(b) > 128 for a, b in zip(full_c, full_r)) > 0
    for ids, full in zip(tok["chosen_ids"], full_c):
        assert len(ids) <= 128 and ids == full[-len(ids) :]  # the tail (response + EOS) survives
