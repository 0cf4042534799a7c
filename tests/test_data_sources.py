"""Every loader on small fixtures in the sources' ORIGINAL layouts (tests/fixtures/data), and its errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import datasets
import pytest

from pipeline.data import FORMATS, PreferenceDataError, load_source, load_stats, split_dialogue
from pipeline.data.formats.simple import summarize_prompt


H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return fixtures_dir / "data"


def rows(ds):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in ds]


def test_split_dialogue_layouts():
    assert split_dialogue(f"{H} a{A} b{H} c{A} d") == (f"{H} a{A} b{H} c{A}", " d")
    assert split_dialogue("## Human:\nq\n\n## Assistant:\n answer") == ("## Human:\nq\n\n## Assistant:\n", " answer")
    assert split_dialogue("## Human:\nq\n\n## Assistant: x") == ("## Human:\nq\n\n## Assistant:", " x")
    # the LAST marker of either layout wins
    assert split_dialogue(f"## Human:\nq{A} z\n\n## Assistant:\nr")[1] == "r"
    assert split_dialogue("no marker") is None


def test_hh_rlhf_hub_dir_layout(fx):
    ds = load_source("hh-rlhf", str(fx / "hh-rlhf"), split="train", data_dir="harmless-base")
    assert rows(ds) == [
        (f"{H} How do I bake bread?{A}", " Mix flour, water, yeast and salt, then bake.", " Buy it."),
        (f"{H} Hi{A} Hello!{H} Tell me a joke.{A}", " Why did the chicken cross the road?", " No."),
    ]
    assert set(ds["source"]) == {"hh-rlhf"}
    st = load_stats(ds)
    assert (st["records"], st["pairs"], st["identical"], st["context_mismatch"]) == (4, 2, 1, 1)
    # the same directory through `name` and a direct path to the gz file
    assert rows(load_source("hh-rlhf", str(fx / "hh-rlhf"), split="test", name="harmless-base")) == rows(
        load_source("hh-rlhf", str(fx / "hh-rlhf/harmless-base/test.jsonl.gz"))
    )
    for r in ds:  # the schema contract: prompt + chosen is the full transcript
        assert r["prompt"].endswith(A)


def test_hh_rlhf_context_mismatch_rules(fx):
    path = str(fx / "hh-rlhf/harmless-base/train.jsonl.gz")
    common = load_source("hh-rlhf", path, context_mismatch="common")
    assert rows(common)[-1] == (
        f"{H} Can you help me steal?{A}",
        " No, I can't help with that.",
        f" Sure.{H} Really?{A} Yes, here is how.",
    )
    assert load_stats(common)["context_mismatch_common"] == 1
    with pytest.raises(PreferenceDataError, match="different contexts"):
        load_source("hh-rlhf", path, context_mismatch="error")


def test_directory_with_several_splits_needs_a_split(fx):
    with pytest.raises(PreferenceDataError, match="several splits"):
        load_source("hh-rlhf", str(fx / "hh-rlhf/harmless-base"))
    with pytest.raises(PreferenceDataError, match="no data file for split 'validation'"):
        load_source("hh-rlhf", str(fx / "hh-rlhf/harmless-base"), split="validation")


def test_more_json_both_layouts_and_order(fx):
    hh = load_source("more-json", str(fx / "more-json/helpful.test.json"))
    assert rows(hh) == [
        (f"{H} Hi{A} Hello!{H} How are you?{A}", " Fine, thanks.", " Go away."),
        (f"{H} Capital of France?{A}", " Paris.", " Lyon."),  # higher score second: still chosen
    ]
    web = load_source("more-json", str(fx / "more-json/webgpt.test.json"), with_margin=True, source="webgpt")
    assert rows(web) == [
        ("## Human:\nWhy is the sky blue?\n\n\n\n## Assistant:\n", " Rayleigh scattering [1].", " Because it is."),
        ("## Human:\nWhy do cats purr?\n\n## Assistant:\n", " To communicate [2].", " Nobody knows."),
    ]
    assert web["margin"] == [1.0, 2.0] and set(web["source"]) == {"webgpt"}
    assert load_stats(web)["ties"] == 1


def test_webgpt_hub_layout(fx):
    ds = load_source("webgpt", str(fx / "webgpt/comparisons.jsonl"))
    assert rows(ds) == [
        (f"{H} Why is the sky blue?{A}", " Rayleigh scattering [1].", " Because."),
        (f"{H} Why do cats purr?{A}", " To communicate [1].", " Nobody knows."),
    ]
    assert load_stats(ds)["ties"] == 1
    assert rows(load_source("webgpt", str(fx / "webgpt-hub"), split="train")) == rows(ds)  # parquet hub dir


def test_summarize(fx):
    ds = load_source("summarize", str(fx / "summarize/comparisons/batch1.json"))  # JSONL despite .json
    assert len(ds) == 4
    assert ds[0]["prompt"] == summarize_prompt("tifu", "Homework trouble", "My cat ate my homework.")
    assert ds[0]["prompt"].endswith(f"POST: My cat ate my homework.{A}")
    assert (ds[0]["chosen"], ds[0]["rejected"]) == (" Cat ate homework.", " Dog.")
    assert (ds[1]["chosen"], ds[1]["rejected"]) == (" Moved, lonely.", " I feel ok.")
    # the edit-batch quirks: no info.id, "r/" prefix (not doubled), no leading space on the summaries
    assert "SUBREDDIT: r/relationships\n" in ds[2]["prompt"] and "r/r/" not in ds[2]["prompt"]
    assert ds[2]["chosen"] == " Boyfriend talks slowly."
    assert "POST: The mayor opened a bridge." in ds[3]["prompt"]  # CNN/DM row: info.article
    valid = load_source("summarize", str(fx / "summarize/comparisons"), record_splits=["valid1", "valid2"])
    assert len(valid) == 3 and load_stats(valid)["other_split"] == 1


def test_shp(fx):
    ds = load_source("shp", str(fx / "shp"), split="train")
    assert rows(ds) == [
        (f"{H} Why is ice slippery?{A}", " A thin water layer.", " Magic."),
        (f"{H} Why do we sleep?{A}", " To consolidate memory.", " Nobody knows."),  # labels 0: B preferred
    ]
    assert len(load_source("shp", str(fx / "shp"), split="train", min_score_ratio=2.0)) == 1
    assert len(load_source("shp", str(fx / "shp/askscience"), split="test")) == 1


EXPECTED_OASST = [
    (f"{H} What is a prime?{A}", " A number with exactly two divisors.", " A number divisible only by 1 and itself."),
    (f"{H} What is a prime?{A}", " A number with exactly two divisors.", " An odd number."),
    (f"{H} What is a prime?{A}", " A number divisible only by 1 and itself.", " An odd number."),
    (f"{H} What is a prime?{A} A number with exactly two divisors.{H} Give an example.{A}", " Seven.", " Nine."),
    (f"{H} Tell me a fact.{A}", " Water boils at 100 C at sea level.", " Honey never spoils."),
    (f"{H} Tell me a fact.{A}", " The moon is cheese.", " Honey never spoils."),
]


def test_oasst1_export_trees(fx):
    ds = load_source("oasst1", str(fx / "oasst1/trees.jsonl"))
    assert sorted(rows(ds)) == sorted(EXPECTED_OASST)
    st = load_stats(ds)
    assert st["ties"] == 1  # e1 and e2 both rank 0
    assert st["unranked_replies"] == 1  # a4
    assert st["trees"] == 3
    # deleted a5 (1), synthetic p3 + 2 replies (3), synthetic tree t2 (3)
    assert st["skipped_messages"] == 7


def test_oasst1_flat_hub_table_matches_trees(fx):
    train = rows(load_source("oasst1", str(fx / "oasst1-hub"), split="train"))
    valid = rows(load_source("oasst1", str(fx / "oasst1-hub"), split="validation"))
    trees = rows(load_source("oasst1", str(fx / "oasst1/trees.jsonl")))
    assert train + valid == trees  # same pairs, same order, from the parent_id table
    assert len(load_source("oasst1", str(fx / "oasst1/trees.jsonl"), lang="en")) == len(trees)
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        load_source("oasst1", str(fx / "oasst1/trees.jsonl"), lang="de")


def test_jsonl_own_schema(fx):
    ds = load_source("jsonl", str(fx / "ours/pairs.jsonl"), source="mine")
    assert ds["source"] == ["mine", "math"] and ds["margin"] == [1.0, 0.5]
    assert ds.features["margin"].dtype == "float64"


def test_synthetic_format():
    ds = load_source("synthetic", "webgpt", split="test", n_test=7, seed=3)
    assert len(ds) == 7 and set(ds["source"]) == {"webgpt"} and "true_prob" in ds.column_names
    with pytest.raises(PreferenceDataError, match="unknown synthetic source"):
        load_source("synthetic", "reddit")


def test_json_array_and_jsonl_parquet_equivalence(fx, tmp_path):
    recs = [json.loads(l) for l in gzip.open(fx / "hh-rlhf/harmless-base/train.jsonl.gz", "rt")]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in recs))  # blank lines ok
    datasets.Dataset.from_list(recs).to_parquet(tmp_path / "d.parquet")
    ref = rows(load_source("hh-rlhf", str(fx / "hh-rlhf/harmless-base/train.jsonl.gz")))
    for name in ("a.json", "b.json", "c.jsonl", "d.parquet"):
        assert rows(load_source("hh-rlhf", str(tmp_path / name))) == ref, name


def test_hub_id_goes_through_load_dataset(fx, monkeypatch):
    calls = []
    local = datasets.Dataset.from_list([json.loads(l) for l in open(fx / "webgpt/comparisons.jsonl")])

    def fake_load_dataset(path, name=None, split=None, data_dir=None, **kw):
        calls.append((path, name, split, data_dir))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_source("webgpt", "openai/webgpt_comparisons")
    assert calls == [("openai/webgpt_comparisons", None, "train", None)]
    assert rows(ds) == rows(load_source("webgpt", str(fx / "webgpt/comparisons.jsonl")))
    load_source("webgpt", "openai/webgpt_comparisons", split="train", name="cfg", data_dir="sub")
    assert calls[-1] == ("openai/webgpt_comparisons", "cfg", "train", "sub")


# -- errors --------------------------------------------------------------------------------------------


def test_error_unknown_format(fx):
    with pytest.raises(PreferenceDataError) as e:
        load_source("hh", str(fx / "ours/pairs.jsonl"))
    assert "unknown data format 'hh'" in str(e.value)
    for f in FORMATS:
        assert f in str(e.value)


def test_error_malformed_line_names_file_and_line(fx):
    with pytest.raises(PreferenceDataError) as e:
        load_source("hh-rlhf", str(fx / "bad/malformed_line.jsonl"), source="harmless")
    msg = str(e.value)
    assert "malformed_line.jsonl, line 3" in msg and "'harmless'" in msg and "Fix:" in msg


def test_error_missing_field_names_field_and_line(fx):
    with pytest.raises(PreferenceDataError) as e:
        load_source("hh-rlhf", str(fx / "bad/missing_field.jsonl"))
    assert "missing_field.jsonl, line 2" in str(e.value) and "field 'rejected'" in str(e.value)
    with pytest.raises(PreferenceDataError, match="field 'question.full_text'"):
        load_source("webgpt", str(fx / "bad/webgpt_missing_question.jsonl"))
    with pytest.raises(PreferenceDataError, match="no assistant marker"):
        load_source("hh-rlhf", str(fx / "bad/no_marker.jsonl"))
    with pytest.raises(PreferenceDataError, match="field 'text'"):
        load_source("more-json", str(fx / "hh-rlhf/harmless-base/test.jsonl.gz"))  # wrong format


def test_error_empty_after_filtering(fx):
    with pytest.raises(PreferenceDataError, match="no preference pairs left after filtering.*'identical': 2"):
        load_source("hh-rlhf", str(fx / "bad/all_identical.jsonl"))
    with pytest.raises(PreferenceDataError, match="'ties': 1"):
        load_source("more-json", str(fx / "more-json/all_ties.json"))


def test_error_missing_path_and_bad_options(fx, tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_source("jsonl", str(tmp_path / "nope.jsonl"))
    with pytest.raises(PreferenceDataError, match="unknown option"):
        load_source("webgpt", str(fx / "webgpt/comparisons.jsonl"), context_mismatch="drop")
    shutil.copy(fx / "ours/pairs.jsonl", tmp_path / "pairs.csv")
    with pytest.raises(PreferenceDataError, match="unsupported file type"):
        load_source("jsonl", str(tmp_path / "pairs.csv"))
    (tmp_path / "array.json").write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(PreferenceDataError, match="array.json, line 2"):
        load_source("jsonl", str(tmp_path / "array.json"))


def test_directory_split_naming(tmp_path, fx):
    recs = [json.loads(l) for l in gzip.open(fx / "hh-rlhf/harmless-base/test.jsonl.gz", "rt")]
    (tmp_path / "helpful.train.json").write_text(json.dumps(recs[:1]))  # MORE/DSP naming
    (tmp_path / "helpful.test.json").write_text(json.dumps(recs))
    assert len(load_source("hh-rlhf", str(tmp_path), split="test")) == 2
    assert len(load_source("hh-rlhf", str(tmp_path), split="train")) == 1
    other = tmp_path / "batches"
    other.mkdir()
    (other / "batch1.json").write_text(json.dumps(recs[:1]))
    (other / "edit_b2_eval_test.json").write_text(json.dumps(recs))  # not a split name: read everything
    assert len(load_source("hh-rlhf", str(other))) == 3


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(PreferenceDataError, match="not a local path, and loading it from the hub failed"):
        load_source("webgpt", "openai/webgpt_comparisons")


# -- hostile inputs (issue 12) -----------------------------------------------------------------------------


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


PAIR = {"prompt": f"{H} q{A}", "chosen": " yes", "rejected": " no"}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected_with_file_line_field(tmp_path, literal):
    ok = json.dumps({**PAIR, "margin": 1.0})
    bad = json.dumps(PAIR)[:-1] + f', "margin": {literal}}}'  # json.loads reads these literals as floats
    with pytest.raises(PreferenceDataError, match=r"m\.jsonl, line 2, field 'margin': the number is .*not finite"):
        load_source("jsonl", _write_lines(tmp_path / "m.jsonl", [ok, bad]))
    texts = [f"{H} q{A} a", f"{H} q{A} b", f"{H} q{A} c"]
    more = f'{{"text": {json.dumps(texts)}, "score": [1.0, {literal}, 0.5]}}'
    with pytest.raises(PreferenceDataError, match=r"s\.json, line 1, field 'score\.1'.*not finite"):
        load_source("more-json", _write_lines(tmp_path / "s.json", [more]), with_margin=True)
    web = {"question": {"full_text": "q"}, "answer_0": "a", "answer_1": "b", "score_0": 1.0}
    line = json.dumps(web)[:-1] + f', "score_1": {literal}}}'
    with pytest.raises(PreferenceDataError, match=r"field 'score_1'.*not finite"):
        load_source("webgpt", _write_lines(tmp_path / "w.jsonl", [line]))


def test_non_finite_margin_in_parquet_is_rejected(tmp_path):
    datasets.Dataset.from_list([{**PAIR, "margin": 1.0}, {**PAIR, "margin": float("nan")}]).to_parquet(
        tmp_path / "p.parquet"
    )
    with pytest.raises(PreferenceDataError, match=r"p\.parquet, row 1, field 'margin'.*nan"):
        load_source("jsonl", str(tmp_path / "p.parquet"))


def _msg(mid, parent, role, text, rank=None):
    return json.dumps({"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en"})


@pytest.mark.timeout(20)  # the old code looped here until memory ran out
def test_oasst1_flat_duplicate_ids_and_cycles_are_counted_never_looped(tmp_path):
    lines = [
        _msg("p1", None, "prompter", "Question?"),
        _msg("a1", "p1", "assistant", "Good answer.", 0),
        _msg("a2", "p1", "assistant", "Bad answer.", 1),
        _msg("p1", "p1", "prompter", "A duplicate id that is its own parent."),
        _msg("x", "x", "prompter", "Its own parent."),
        _msg("c1", "c2", "prompter", "Cycle one."),
        _msg("c2", "c1", "assistant", "Cycle two.", 0),
        _msg("d", "c1", "assistant", "Below the cycle.", 0),
        _msg("o", "missing", "assistant", "An orphan.", 0),
    ]
    ds = load_source("oasst1", _write_lines(tmp_path / "flat.jsonl", lines))
    assert rows(ds) == [(f"{H} Question?{A}", " Good answer.", " Bad answer.")]
    st = load_stats(ds)
    assert (st["duplicate_message_ids"], st["cycle_messages"], st["orphan_messages"], st["trees"]) == (1, 4, 1, 1)


def test_oasst1_bad_rank_or_reply_without_text_names_the_field(tmp_path):
    tree = {
        "message_id": "p",
        "role": "prompter",
        "text": "Q?",
        "replies": [
            {"message_id": "a", "role": "assistant", "text": "one", "rank": 0, "replies": []},
            {"message_id": "b", "role": "assistant", "text": "two", "rank": "1", "replies": []},
        ],
    }
    with pytest.raises(
        PreferenceDataError, match=r"t\.jsonl, line 1, message 'b', field 'rank': rank must be a whole"
    ):
        load_source("oasst1", _write_lines(tmp_path / "t.jsonl", [json.dumps(tree)]))
    tree["replies"][1]["rank"] = 1
    del tree["replies"][1]["text"]
    with pytest.raises(PreferenceDataError, match=r"message 'b', field 'text': missing field"):
        load_source("oasst1", _write_lines(tmp_path / "t.jsonl", [json.dumps(tree)]))
    flat = [
        _msg("p", None, "prompter", "Q?"),
        _msg("a", "p", "assistant", "one", 0),
        json.dumps({"message_id": "b", "parent_id": "p", "role": "assistant", "rank": 1}),
    ]
    with pytest.raises(PreferenceDataError, match=r"f\.jsonl, line 3, field 'text': missing field"):
        load_source("oasst1", _write_lines(tmp_path / "f.jsonl", flat))


def test_truncated_gzip_bom_and_latin1(tmp_path):
    data = gzip.compress(("".join(json.dumps({**PAIR, "chosen": f" yes {i}"}) + "\n" for i in range(200))).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreferenceDataError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip file.*Fix: re-download"):
        load_source("jsonl", str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(PAIR) + "\n").encode())
    assert rows(load_source("jsonl", str(tmp_path / "bom.jsonl"))) == [(PAIR["prompt"], " yes", " no")]
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress((tmp_path / "bom.jsonl").read_bytes()))
    assert len(load_source("jsonl", str(tmp_path / "bom.jsonl.gz"))) == 1
    (tmp_path / "latin1.jsonl").write_bytes(
        (json.dumps(PAIR) + "\n").encode() + '{"prompt": "café"}\n'.encode("latin-1")
    )
    with pytest.raises(PreferenceDataError, match=r"latin1\.jsonl, line 2: byte 0xe9 is not UTF-8.*Fix: convert"):
        load_source("jsonl", str(tmp_path / "latin1.jsonl"))


def test_option_values_checked_summarize_choice_bool_and_record_splits_string(fx, tmp_path):
    hh = str(fx / "hh-rlhf/harmless-base/train.jsonl.gz")
    with pytest.raises(PreferenceDataError, match="context_mismatch='commn' is not one of drop, common, error"):
        load_source("hh-rlhf", hh, context_mismatch="commn")
    with pytest.raises(PreferenceDataError, match="context_mismatch"):
        load_source("more-json", str(fx / "more-json/helpful.test.json"), context_mismatch=True)
    comp = {
        "info": {"post": "A post.", "title": "T"},
        "summaries": [{"text": "one"}, {"text": "two"}],
        "choice": True,
        "split": "valid1",
    }
    path = _write_lines(tmp_path / "s.jsonl", [json.dumps(comp)])
    with pytest.raises(PreferenceDataError, match=r"s\.jsonl, line 1, field 'choice': expected int, got bool True"):
        load_source("summarize", path)
    comp["choice"] = 1
    path = _write_lines(tmp_path / "s.jsonl", [json.dumps(comp), json.dumps({**comp, "split": "valid2"})])
    one = load_source("summarize", path, record_splits="valid1")  # one split, not the characters v,a,l,i,d,1
    assert len(one) == 1 and load_stats(one)["other_split"] == 1
    assert len(load_source("summarize", path, record_splits=["valid1", "valid2"])) == 2
    with pytest.raises(PreferenceDataError, match="record_splits=3"):
        load_source("summarize", path, record_splits=3)


def test_a_record_nested_too_deeply_is_one_error_naming_the_file(tmp_path):
    """A JSON record nested 100,000 deep is one PreferenceDataError naming the file and line (it was a raw
    RecursionError), in JSON lines, a JSON array and a pretty-printed single object."""
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _write_lines(tmp_path / "deep.jsonl", [json.dumps(PAIR), deep])
    with pytest.raises(PreferenceDataError, match=r"deep\.jsonl, line 2: a JSON value nested deeper.*Fix: flatten"):
        load_source("jsonl", path)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PreferenceDataError, match=r"deep\.json: a JSON value nested deeper"):
        load_source("jsonl", str(tmp_path / "deep.json"))


def test_a_huge_decompressed_gz_line_is_refused_at_the_documented_limit(tmp_path, monkeypatch):
    """A small .gz file that decompresses to a huge line stops at MAX_GZ_LINE_BYTES with one error naming the
    file, the line and the limit (before the line is held whole); lines under the limit read as before."""
    import pipeline.data.read as R

    monkeypatch.setattr(R, "MAX_GZ_LINE_BYTES", 1 << 20, raising=False)  # 1 MiB: the test stays small
    monkeypatch.setattr(R, "_GZ_CHUNK", 1 << 16, raising=False)
    big = json.dumps({**PAIR, "chosen": " " + "a" * (3 << 20)})
    (tmp_path / "bomb.jsonl.gz").write_bytes(gzip.compress((json.dumps(PAIR) + "\n" + big + "\n").encode()))
    assert (tmp_path / "bomb.jsonl.gz").stat().st_size < 20_000
    with pytest.raises(PreferenceDataError, match=r"bomb\.jsonl\.gz, line 2: a decompressed line longer than 1 MiB"):
        load_source("jsonl", str(tmp_path / "bomb.jsonl.gz"))
    ok = "".join(json.dumps({**PAIR, "chosen": f" yes {i} " + "b" * 1000}) + "\n" for i in range(2000))
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(ok.encode()))
    assert len(load_source("jsonl", str(tmp_path / "ok.jsonl.gz"))) == 2000
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "64 MiB" in readme and "MAX_GZ_LINE_BYTES" in readme  # the limit is documented
