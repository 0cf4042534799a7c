"""The `trl` data format in every layout (tests/fixtures/data/trl, made by make_trl_fixtures.py), `group_by`,
and conversational rows through splitting and mixing."""

from __future__ import annotations

import json

import pytest

from pipeline.data import DataConfig, PreferenceDataError, build_splits, load_source, load_stats, mix
from pipeline.data.render import decode_conversation


@pytest.fixture(scope="module")
def trl_dir(fixtures_dir):
    return fixtures_dir / "data" / "trl"


def test_explicit_conversational_hub_dir(trl_dir):
    ds = load_source("trl", str(trl_dir / "conv-hub"), split="train")  # two parquet shards
    stats = load_stats(ds)
    assert (stats["records"], stats["pairs"], stats["identical"]) == (9, 8, 1)
    assert ds.column_names == ["prompt", "chosen", "rejected", "source", "conversation", "margin"]  # extra dropped
    row = ds[1]
    conv = decode_conversation(row["conversation"])
    assert [m["role"] for m in conv["prompt"]] == ["system", "user", "assistant", "user"]
    assert conv["chosen"] == [{"role": "assistant", "content": "A horse has four legs."}]
    assert row["prompt"] == (
        "\n\nSystem: You are terse.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How many legs "
        "has a horse got?\n\nAssistant:"
    )
    assert row["chosen"] == " A horse has four legs." and row["margin"] == 1.0
    assert len(load_source("trl", str(trl_dir / "conv-hub"), split="test")) == 2


def test_implicit_conversational_jsonl_matches_explicit(trl_dir):
    explicit = load_source("trl", str(trl_dir / "conv-hub"), split="train")
    implicit = load_source("trl", str(trl_dir / "implicit-conv.jsonl"))
    assert load_stats(implicit)["identical"] == 1
    assert implicit["conversation"][:5] == explicit["conversation"][:5]
    last = decode_conversation(implicit[-1]["conversation"])  # shared first reply: the prompt has 3 messages
    assert [m["content"] for m in last["prompt"]] == ["Count to two.", "One.", "Go on."]
    assert last["chosen"][0]["content"] == "Two." and last["rejected"][0]["content"] == "Five."


def test_standard_layouts(trl_dir):
    explicit = load_source("trl", str(trl_dir / "explicit-std.json"))
    implicit = load_source("trl", str(trl_dir / "implicit-std.jsonl.gz"))
    assert "conversation" not in explicit.column_names
    assert explicit[0] == {
        "prompt": "What color is the sky?",
        "chosen": " It is blue on a clear day.",
        "rejected": " It is green.",
        "source": "trl",
    }
    # TRL's extract_prompt: the longest common CHARACTER prefix, the space before the split going to the
    # responses (so responses that start alike share their start with the prompt)
    assert implicit[0]["prompt"] == "What color is the sky? It is" and implicit[0]["chosen"] == " blue on a clear day."
    assert (
        implicit[1]["prompt"] == "How many legs has a horse got?"
        and implicit[1]["chosen"] == " A horse has four legs."
    )
    for i, e in zip(implicit, explicit):
        assert (i["prompt"] + i["chosen"], i["prompt"] + i["rejected"]) == (
            e["prompt"] + e["chosen"],
            e["prompt"] + e["rejected"],
        )
    assert (load_stats(explicit)["identical"], load_stats(implicit)["identical"]) == (1, 1)


def test_save_to_disk_dir(trl_dir, tmp_path):
    import datasets

    rows = [json.loads(x) for x in (trl_dir / "implicit-conv.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows[:10]).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10])}).save_to_disk(str(tmp_path / "dd"))
    ref = load_source("trl", str(trl_dir / "implicit-conv.jsonl"))
    assert load_source("trl", str(tmp_path / "saved"))["conversation"] == ref["conversation"][:10]
    assert load_source("trl", str(tmp_path / "dd"), split="train")["conversation"] == ref["conversation"][:10]
    with pytest.raises(PreferenceDataError, match="split"):
        load_source("trl", str(tmp_path / "dd"), split="test")


@pytest.mark.parametrize(
    "name, field, problem",
    [
        ("no_role", "chosen[0]", "without 'role'"),
        ("prompt_ends_assistant", "prompt", "ends with an assistant turn"),
        ("mixed_kinds", "chosen/rejected", "chosen is list but rejected is str"),
    ],
)
def test_bad_rows_name_file_row_field(trl_dir, name, field, problem):
    with pytest.raises(PreferenceDataError) as e:
        load_source("trl", str(trl_dir / "bad" / f"{name}.jsonl"))
    msg = str(e.value)
    assert f"{name}.jsonl, line 2" in msg and f"field {field!r}" in msg and problem in msg


def test_group_by_rewardbench_layout(trl_dir):
    ds = load_source("trl", str(trl_dir / "rewardbench.jsonl"), source="rb", group_by="subset")
    assert load_stats(ds)["groups"] == {"rb/chat-easy": 6, "rb/code-python": 4, "rb/refusals": 1}
    kept = load_source(
        "trl",
        str(trl_dir / "rewardbench.jsonl"),
        source="rb",
        group_by="subset",
        drop_groups=["refusals"],
        group_names={"code-python": "code"},
    )
    assert sorted(set(kept["source"])) == ["code", "rb/chat-easy"] and load_stats(kept)["other_group"] == 1
    only = load_source("trl", str(trl_dir / "rewardbench.jsonl"), group_by="subset", keep_groups=["refusals"])
    assert only["source"] == ["trl/refusals"]
    with pytest.raises(PreferenceDataError, match="field 'subset'"):
        load_source("trl", str(trl_dir / "explicit-std.json"), group_by="subset")
    with pytest.raises(PreferenceDataError, match="need group_by"):
        load_source("trl", str(trl_dir / "rewardbench.jsonl"), keep_groups=["x"])


def test_keep_or_drop_groups_naming_absent_values_list_the_values_present(trl_dir, tmp_path):
    """Issue 17: a keep_groups value that no row has was silently ignored (or failed without the values)."""
    path = str(trl_dir / "rewardbench.jsonl")
    with pytest.raises(PreferenceDataError) as e:
        load_source("trl", path, source="rb", group_by="subset", keep_groups=["refusals", "chat-hard"])
    msg = str(e.value)
    assert "\n" not in msg and "keep_groups names ['chat-hard']" in msg and "rewardbench.jsonl" in msg
    assert "'chat-easy', 'code-python', 'refusals'" in msg and "Fix:" in msg
    with pytest.raises(PreferenceDataError, match=r"drop_groups names \['typo'\].*'chat-easy'"):
        load_source("trl", path, source="rb", group_by="subset", drop_groups=["typo"])
    many = tmp_path / "many.jsonl"  # a long list of present values is cut
    many.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": " a", "rejected": " b", "g": f"v{i:03d}"}) + "\n"
            for i in range(50)
        )
    )
    with pytest.raises(PreferenceDataError, match=r"'v019' \.\.\. \(\+30 more\)"):
        load_source("trl", str(many), group_by="g", keep_groups=["nope"])


def test_implicit_prompt_that_would_be_empty_is_an_error_naming_the_row(tmp_path):
    """Issue 17: implicit pairs without a common prefix trained with an empty prompt."""
    f = tmp_path / "implicit.jsonl"
    rows = [
        {"chosen": "Q? Yes.", "rejected": "Q? No."},
        {"chosen": "Sure, here it is.", "rejected": "No way."},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceDataError) as e:
        load_source("trl", str(f), source="mine")
    msg = str(e.value)
    assert "implicit.jsonl, line 2" in msg and "empty" in msg and "'prompt' column" in msg and "\n" not in msg
    f.write_text(json.dumps(rows[0]) + "\n")
    assert load_source("trl", str(f))["prompt"] == ["Q?"]


def test_group_by_other_formats(fixtures_dir):
    """group_by works for the paper's formats too (any column of the record)."""
    ds = load_source("webgpt", str(fixtures_dir / "data" / "webgpt" / "comparisons.jsonl"), group_by="score_0")
    assert all(s.startswith("webgpt/") for s in ds["source"]) and len(set(ds["source"])) > 1


def test_build_splits_expands_groups_and_mixes_kinds(trl_dir, fixtures_dir):
    cfg = DataConfig(
        sources=[
            {
                "name": "uf",
                "format": "trl",
                "path": str(trl_dir / "conv-hub"),
                "split": "train",
                "test_split": "test",
                "options": {"group_by": "source"},
            },
            {
                "name": "rb",
                "format": "trl",
                "path": str(trl_dir / "rewardbench.jsonl"),
                "split": None,
                "options": {"group_by": "subset", "drop_groups": ["refusals"]},
            },
            {
                "name": "hh",
                "format": "hh-rlhf",
                "path": str(fixtures_dir / "data" / "hh-rlhf"),
                "split": "train",
                "options": {"data_dir": "harmless-base"},
            },
        ],
        test_fraction=0.2,
        valid_fraction=0.2,
        n_train_per_source=6,
    )
    splits = build_splits(cfg)
    assert list(splits) == ["uf/chat", "uf/code", "rb/chat-easy", "rb/code-python", "hh"]
    assert len(splits["uf/code"]["test"]) == 1 and len(splits["uf/chat"]["test"]) == 1  # from the test split
    for name, dd in splits.items():
        assert set(dd["train"]["source"]) == {name}
        assert not set(dd["train"]["prompt"]) & set(dd["test"]["prompt"])  # split by (rendered) prompt
    mixed = mix({s: d["train"] for s, d in splits.items()}, "balanced", per_source_batch=2)
    assert "conversation" in mixed.column_names and len(mixed) == 30
    kinds = {(s, bool(c)) for s, c in zip(mixed["source"], mixed["conversation"])}
    assert ("uf/chat", True) in kinds and ("hh", False) in kinds and ("rb/chat-easy", False) in kinds


def test_group_name_clash(trl_dir):
    cfg = DataConfig(
        sources=[
            {
                "name": "x",
                "format": "trl",
                "path": str(trl_dir / "rewardbench.jsonl"),
                "split": None,
                "options": {"group_by": "subset", "group_names": {"refusals": "y"}},
            },
            {"name": "y", "format": "trl", "path": str(trl_dir / "explicit-std.json"), "split": None},
        ]
    )
    with pytest.raises(PreferenceDataError, match="clashes"):
        build_splits(cfg)


def test_implicit_option_ignores_a_prompt_string(tmp_path):
    """argilla/ultrafeedback-binarized-preferences-cleaned style: a prompt string beside chosen/rejected that
    hold the whole conversation; without the option the mixed kinds are an error naming the fix."""
    rec = {
        "source": "evol",
        "prompt": "Hi?",
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go."}],
    }
    f = tmp_path / "uf.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    ds = load_source("trl", str(f), implicit=True, group_by="source", source="uf")
    assert ds[0]["source"] == "uf/evol" and decode_conversation(ds[0]["conversation"])["prompt"] == rec["chosen"][:1]
    with pytest.raises(PreferenceDataError, match="implicit=true"):
        load_source("trl", str(f))


@pytest.mark.parametrize("name", ["implicit-conv.jsonl", "implicit-std.jsonl.gz", "explicit-std.json"])
def test_data_layer_and_trainer_tokenize_trl_rows_alike(trl_dir, chat_tok, tmp_path, name):
    """The same TRL file, read by the data layer (`load_source('trl')` + `tokenize_pairs`) or handed to
    MORERewardTrainer as it is (conversational rows: TRL's own preparation), gives the same token ids."""
    import datasets

    from pipeline.data.tokenize import tokenize_pairs
    from pipeline.models import TinyModelSpec, tiny_model
    from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer

    records = [json.loads(line) for line in _read_lines(trl_dir / name)]
    records = [r for r in records if r["chosen"] != r["rejected"]]  # the data layer drops identical pairs
    loaded, _ = tokenize_pairs(load_source("trl", str(trl_dir / name)), chat_tok, None)
    args = MORERewardConfig(
        output_dir=str(tmp_path), method="multitask", max_length=None, bf16=False, report_to="none", use_cpu=True
    )
    trainer = MORERewardTrainer(
        tiny_model(TinyModelSpec(), chat_tok, task="reward"),
        args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=chat_tok,
    )
    assert trainer.train_dataset["chosen_ids"] == loaded["chosen_ids"]
    assert trainer.train_dataset["rejected_ids"] == loaded["rejected_ids"]


def _read_lines(path):
    import gzip

    if path.suffix == ".json":
        return [json.dumps(r) for r in json.loads(path.read_text())]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n"
    "{% endif %}{% if lang %}<|im_start|>system\nlang {{ lang }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.get('name') %} {{ m['name'] }}{% endif %}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }}){% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_and_chat_template_kwargs_reach_the_template_as_in_trl(tmp_path):
    """TRL's `tools` (a list, or a JSON string of one) and `chat_template_kwargs` columns, and assistant turns that
    call tools (`tool_calls`, no content) followed by `tool` turns with a `name`: the data layer renders them like
    trl.RewardTrainer (same token ids), and the plain layout keeps the calls as text."""
    import datasets

    from pipeline.data.synthetic import SyntheticConfig, synthetic_corpus
    from pipeline.data.tokenize import tokenize_pairs
    from pipeline.models import TinyModelSpec, tiny_model, tiny_tokenizer
    from pipeline.reward.trainer import MORERewardConfig, MORERewardTrainer

    tok = tiny_tokenizer(synthetic_corpus(SyntheticConfig()), vocab_size=1000, chat_template=TOOLS_TEMPLATE)
    tool = {"type": "function", "function": {"name": "get_time", "description": "time", "parameters": {}}}
    call = {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}
    user = [{"role": "user", "content": "What time is it in Oslo?"}]
    records = [
        {
            "prompt": user,
            "chosen": [
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": "get_time", "content": "10:00"},
                {"role": "assistant", "content": "It is ten."},
            ],
            "rejected": [{"role": "assistant", "content": "No idea."}],
            "tools": json.dumps([tool]),  # TRL's JSON-string form
            "chat_template_kwargs": {"lang": "en"},
        },
        {
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go."}],
            "tools": json.dumps([tool]),
            "chat_template_kwargs": {"lang": "de"},
        },
    ]
    f = tmp_path / "tools.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_source("trl", str(f))
    conv = decode_conversation(ds[0]["conversation"])
    assert conv["tools"] == [tool] and conv["chat_template_kwargs"] == {"lang": "en"}
    assert '"get_time"' in ds[0]["chosen"] and "It is ten." in ds[0]["chosen"]  # plain layout keeps the call
    loaded, _ = tokenize_pairs(ds, tok, None)
    text = tok.decode(loaded["chosen_ids"][0])
    assert "tools: get_time" in text and "lang en" in text and "call get_time" in text and "tool get_time" in text
    args = MORERewardConfig(
        output_dir=str(tmp_path / "o"), method="multitask", max_length=None, bf16=False, report_to="none", use_cpu=True
    )
    trainer = MORERewardTrainer(
        tiny_model(TinyModelSpec(), tok, task="reward"),
        args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tok,
    )
    assert trainer.train_dataset["chosen_ids"] == loaded["chosen_ids"]
    assert trainer.train_dataset["rejected_ids"] == loaded["rejected_ids"]


def test_bad_tools_and_template_kwargs_name_the_field(tmp_path):
    base = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go."}],
    }
    for extra, field in (({"tools": "{not json"}, "tools"), ({"chat_template_kwargs": [1]}, "chat_template_kwargs")):
        f = tmp_path / f"{field}.jsonl"
        f.write_text(json.dumps({**base, **extra}) + "\n")
        with pytest.raises(PreferenceDataError, match=field):
            load_source("trl", str(f))
