"""Cut sources are split by a hash of the whole prompt; `options.split_by: first_turn` hashes a dialogue's first
user turn instead, so dialogues that open with the same question never straddle train and evaluation."""

from __future__ import annotations

import json

import pytest

import pipeline.config as C
from pipeline.data import DataConfig, SourceSpec, build_splits
from pipeline.data.mixing import first_turn, split_key
from pipeline.data.sources import PreferenceDataError


def _dialogues(path, n_questions: int = 60, per_question: int = 3):
    """HH-style multi-turn prompts: every opening question continued `per_question` different ways."""
    rows = []
    for q in range(n_questions):
        for k in range(per_question):
            prompt = f"\n\nHuman: opening question {q}?\n\nAssistant: reply {q}.{k}\n\nHuman: follow-up {k} of {q}\n\nAssistant:"
            rows.append({"prompt": prompt, "chosen": f" good {q} {k}", "rejected": f" bad {q} {k}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _straddling(splits: dict) -> int:
    """Opening questions present in train AND in validation or test."""
    parts = splits["hh"]
    train = {first_turn(p) for p in parts["train"]["prompt"]}
    held = {first_turn(p) for k in ("validation", "test") for p in parts[k]["prompt"]}
    return len(train & held)


def _cfg(path, **options):
    spec = SourceSpec(name="hh", format="jsonl", path=str(path), split=None, options=options)
    return DataConfig(sources=[spec], test_fraction=0.2, valid_fraction=0.1)


def test_first_turn_split_keeps_every_opening_question_on_one_side(tmp_path):
    path = _dialogues(tmp_path / "hh.jsonl")
    default = build_splits(_cfg(path))
    assert _straddling(default) > 0  # the documented behaviour of the default: the whole context decides
    by_turn = build_splits(_cfg(path, split_by="first_turn"))
    assert _straddling(by_turn) == 0
    assert sum(len(d) for d in by_turn["hh"].values()) == 180 and len(by_turn["hh"]["test"]) > 0
    # the default is unchanged by the option's existence: the same pairs as splitting by the whole prompt
    explicit = build_splits(_cfg(path, split_by="prompt"))
    for k in ("train", "validation", "test"):
        assert explicit["hh"][k]["prompt"] == default["hh"][k]["prompt"]


def test_first_turn_of_a_prompt():
    p = "\n\nHuman: Is the sky blue?\n\nAssistant: Yes.\n\nHuman: Why?\n\nAssistant:"
    assert first_turn(p) == "\n\nHuman: Is the sky blue?" == split_key(p, "first_turn")
    assert split_key(p) == p and split_key(p, "prompt") == p
    assert first_turn("SUBREDDIT: r/x POST: ... TL;DR:") == "SUBREDDIT: r/x POST: ... TL;DR:"  # no HH layout: whole


def test_a_bad_split_by_is_one_error_naming_the_source(tmp_path):
    path = _dialogues(tmp_path / "hh.jsonl", 5)
    with pytest.raises(PreferenceDataError, match=r"\[source 'hh'\] options.split_by='turns' is not one of"):
        build_splits(_cfg(path, split_by="turns"))


def test_split_by_is_a_recipe_key(tmp_path):
    path = _dialogues(tmp_path / "hh.jsonl", 5)
    r = C.load_recipe(
        "tiny-cpu",
        [f"data.sources=[{{name: hh, format: jsonl, path: {path}, split: null, options: {{split_by: first_turn}}}}]"],
    )
    assert r.data.sources[0].options == {"split_by": "first_turn"}
