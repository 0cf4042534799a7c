"""DataConfig / build_splits / mix / tokenize_pairs."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest

from pipeline.data import (
    DataConfig,
    SourceSpec,
    SyntheticConfig,
    build_splits,
    load_source,
    mix,
    resample_indices,
    source_names,
    tokenize_pairs,
)
from pipeline.data.synthetic import DEFAULT_SOURCES
from pipeline.data.tokenize import encode_left


SMALL_SYN = SyntheticConfig(n_train=40, n_valid=10, n_test=20)


def _src(name, n, extra=None):
    d = {
        "prompt": [f"p{name}{i}" for i in range(n)],
        "chosen": [f"c{name}{i}" for i in range(n)],
        "rejected": [f"r{name}{i}" for i in range(n)],
        "source": [name] * n,
    }
    d.update(extra or {})
    return datasets.Dataset.from_dict(d)


def test_default_config_is_the_five_synthetic_sources():
    cfg = DataConfig(synthetic=SMALL_SYN)
    assert cfg.source_names == list(DEFAULT_SOURCES) and cfg.max_length == 512
    out = build_splits(cfg)
    assert list(out) == list(DEFAULT_SOURCES)
    for name, dd in out.items():
        assert {k: len(v) for k, v in dd.items()} == {"train": 40, "validation": 10, "test": 20}
        assert set(dd["train"]["source"]) == {name}
    again = build_splits(DataConfig(synthetic=SMALL_SYN))
    assert out["oasst1"]["test"].to_dict() == again["oasst1"]["test"].to_dict()
    sized = build_splits(
        DataConfig(synthetic=SMALL_SYN, n_train_per_source=12, n_test_per_source=5, n_valid_per_source=3)
    )
    assert {k: len(v) for k, v in sized["helpful"].items()} == {"train": 12, "validation": 3, "test": 5}


def test_config_from_dicts_and_validation():
    cfg = DataConfig(
        sources=[{"name": "a", "format": "jsonl", "path": "x.jsonl", "options": {"k": 1}}], synthetic={"seed": 3}
    )
    assert isinstance(cfg.sources[0], SourceSpec) and cfg.sources[0].options == {"k": 1}
    assert isinstance(cfg.synthetic, SyntheticConfig) and cfg.synthetic.seed == 3
    with pytest.raises(ValueError, match="unknown key"):
        DataConfig(sources=[{"name": "a", "fromat": "jsonl"}])
    with pytest.raises(ValueError, match="duplicate"):
        DataConfig(sources=[SourceSpec("a"), SourceSpec("a")])
    with pytest.raises(TypeError, match="mixing"):  # removed: the RM's method decides (see test_config.py)
        DataConfig(mixing="interleave")
    with pytest.raises(ValueError, match="set the knobs in data.synthetic"):
        build_splits(DataConfig(sources=[SourceSpec("helpful", options={"seed": 1})]))
    with pytest.raises(ValueError, match="unknown synthetic source 'reddit'"):
        build_splits(DataConfig(sources=[SourceSpec("reddit")]))


def test_single_split_source_is_split_by_prompt(fixtures_dir):
    trees = str(fixtures_dir / "data/oasst1/trees.jsonl")
    spec = SourceSpec(name="oa", format="oasst1", path=trees, split=None)
    cfg = DataConfig(sources=[spec], test_fraction=0.34, valid_fraction=0.0, seed=1)
    dd = build_splits(cfg)["oa"]
    whole = load_source("oasst1", trees)
    parts = {k: set(zip(v["prompt"], v["chosen"], v["rejected"])) for k, v in dd.items()}
    assert sum(len(p) for p in parts.values()) == len(whole)  # a partition
    assert set().union(*parts.values()) == set(zip(whole["prompt"], whole["chosen"], whole["rejected"]))
    assert not set(dd["train"]["prompt"]) & set(dd["test"]["prompt"])  # no prompt in two splits
    assert len(dd["test"]) > 0 and set(dd["train"]["source"]) == {"oa"}
    order = {t: i for i, t in enumerate(zip(whole["prompt"], whole["chosen"], whole["rejected"]))}
    for v in dd.values():  # file order kept inside each split
        idx = [order[t] for t in zip(v["prompt"], v["chosen"], v["rejected"])]
        assert idx == sorted(idx)
    assert build_splits(cfg)["oa"]["test"].to_dict() == dd["test"].to_dict()


def _jsonl_source(path, n_prompts: int, pairs_per_prompt: int = 2):
    import json

    with open(path, "w") as f:
        for i in range(n_prompts):
            for j in range(pairs_per_prompt):
                rec = {"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": f" a{i}.{j}", "rejected": f" b{i}.{j}"}
                f.write(json.dumps(rec) + "\n")
    return str(path)


def _part_of_each_pair(dd) -> dict:
    return {t: k for k, v in dd.items() for t in zip(v["prompt"], v["chosen"], v["rejected"])}


def test_split_depends_on_the_prompt_not_on_the_source_name_order_or_seed(tmp_path):
    """Issue 19: the cut was seeded by the source's NAME, so renaming a source moved test prompts into training."""
    path = _jsonl_source(tmp_path / "d.jsonl", 300)
    other = _jsonl_source(tmp_path / "o.jsonl", 20)

    def parts(name, seed=0, first_other=False, test_fraction=0.1):
        specs = [SourceSpec(name=name, format="jsonl", path=path, split=None)]
        o = SourceSpec(name="zz-other", format="jsonl", path=other, split=None)
        specs = [o, *specs] if first_other else [*specs, o]
        cfg = DataConfig(sources=specs, test_fraction=test_fraction, valid_fraction=0.05, seed=seed)
        return _part_of_each_pair(build_splits(cfg)[name])

    base = parts("mine")
    assert parts("renamed") == base  # the regression: every pair keeps its split under a new name
    assert parts("mine", seed=7) == base and parts("mine", first_other=True) == base
    # a larger test fraction (rm-eval's 0.8) only adds prompts to the test part: nested cuts
    wide = parts("mine", test_fraction=0.8)
    assert {t for t, k in base.items() if k == "test"} <= {t for t, k in wide.items() if k == "test"}
    # all pairs of one prompt share a part, and the part is the one split_of_prompt gives
    from pipeline.data.mixing import split_of_prompt

    assert all(k == split_of_prompt(t[0], 0.1, 0.05) for t, k in base.items())


def test_split_fractions_hold_in_expectation(tmp_path):
    from pipeline.data.mixing import split_of_prompt

    n = 4000
    counts = Counter(split_of_prompt(f"prompt number {i}", 0.1, 0.05) for i in range(n))
    # binomial sd: sqrt(n p (1-p)) = 19 (test) and 14 (validation); 4 sd bounds
    assert abs(counts["test"] - 0.1 * n) < 4 * 19 and abs(counts["validation"] - 0.05 * n) < 4 * 14
    path = _jsonl_source(tmp_path / "d.jsonl", 1000, pairs_per_prompt=1)
    dd = build_splits(DataConfig(sources=[SourceSpec(name="s", format="jsonl", path=path, split=None)]))["s"]
    assert abs(len(dd["test"]) - 100) < 4 * 9.5 and abs(len(dd["validation"]) - 50) < 4 * 6.9
    assert len(dd["train"]) + len(dd["test"]) + len(dd["validation"]) == 1000


def test_test_subsample_is_by_content_too(tmp_path):
    path = _jsonl_source(tmp_path / "d.jsonl", 400)

    def test_pairs(name, seed):
        cfg = DataConfig(
            sources=[SourceSpec(name=name, format="jsonl", path=path, split=None)], n_test_per_source=10, seed=seed
        )
        t = build_splits(cfg)[name]["test"]
        return list(zip(t["prompt"], t["chosen"], t["rejected"]))

    assert len(test_pairs("a", 0)) == 10 and test_pairs("a", 0) == test_pairs("b", 3)


def test_shipped_test_split_and_resampling(fixtures_dir):
    spec = SourceSpec(
        name="harmless",
        format="hh-rlhf",
        path=str(fixtures_dir / "data/hh-rlhf"),
        split="train",
        test_split="test",
        options={"data_dir": "harmless-base"},
    )
    dd = build_splits(DataConfig(sources=[spec], valid_fraction=0.0, n_train_per_source=5))["harmless"]
    assert len(dd["test"]) == 2 and len(dd["validation"]) == 0
    assert len(dd["train"]) == 5 and Counter(Counter(dd["train"]["prompt"]).values()) == Counter({3: 1, 2: 1})


def test_resample_indices():
    rng = np.random.default_rng(0)
    down = resample_indices(10, 4, rng)
    assert len(down) == 4 and len(set(down)) == 4  # without replacement
    up = resample_indices(4, 10, rng)
    assert sorted(Counter(up).values()) == [2, 2, 3, 3]  # every row floor or ceil times
    with pytest.raises(ValueError):
        resample_indices(0, 3, rng)


@pytest.mark.parametrize("psb", [1, 3])
def test_balanced_mix_blocks(psb):
    train = {"b": _src("b", 7), "a": _src("a", 13), "c": _src("c", 2)}
    ds = mix(train, "balanced", per_source_batch=psb, seed=0)
    names = source_names(ds)
    assert names == ["b", "a", "c"]  # declared order, not sorted
    n = -(-13 // psb) * psb
    assert len(ds) == 3 * n
    ids = np.array(ds["source_id"])
    block = 3 * psb
    for start in range(0, len(ds), block):
        assert list(ids[start : start + block]) == [k for k in range(3) for _ in range(psb)]
    assert [names[i] for i in ds["source_id"]] == ds["source"]
    counts = {s: Counter(p for p, src in zip(ds["prompt"], ds["source"]) if src == s) for s in names}
    assert len(counts["a"]) == 13 and set(counts["a"].values()) <= {n // 13, -(-n // 13)}
    assert set(counts["c"].values()) <= {n // 2, -(-n // 2)} and sum(counts["c"].values()) == n
    assert ds.to_dict() == mix(train, "balanced", per_source_batch=psb, seed=0).to_dict()
    assert ds["prompt"] != mix(train, "balanced", per_source_batch=psb, seed=1)["prompt"]


def test_balanced_mix_downsamples_without_replacement():
    ds = mix({"a": _src("a", 50), "b": _src("b", 30)}, "balanced", n_per_source=20, per_source_batch=4, seed=0)
    assert len(ds) == 40
    for s in ("a", "b"):
        ps = [p for p, src in zip(ds["prompt"], ds["source"]) if src == s]
        assert len(ps) == 20 == len(set(ps))


def test_concat_mix_is_a_shuffled_concatenation():
    train = {"a": _src("a", 5, {"margin": [1.0] * 5}), "b": _src("b", 3)}
    ds = mix(train, "concat", seed=0)
    assert sorted(ds["prompt"]) == sorted(list(train["a"]["prompt"]) + list(train["b"]["prompt"]))
    assert list(ds["prompt"]) != list(train["a"]["prompt"]) + list(train["b"]["prompt"])
    assert "margin" not in ds.column_names  # not present in every source
    assert source_names(ds) == ["a", "b"] and [["a", "b"][i] for i in ds["source_id"]] == ds["source"]
    same = mix(train, "concat", n_per_source=4, seed=0)
    balanced = mix(train, "balanced", n_per_source=4, seed=0)
    assert sorted(same["prompt"]) == sorted(balanced["prompt"])  # both baselines see the same pairs
    with pytest.raises(ValueError, match="unknown mixing"):
        mix(train, "interleave")


def test_mix_of_built_splits_keeps_synthetic_columns():
    splits = build_splits(DataConfig(synthetic=SMALL_SYN))
    ds = mix({s: d["train"] for s, d in splits.items()}, "balanced", per_source_batch=2, seed=0)
    assert len(ds) == 5 * 40 and {"true_prob", "gold_prob", "source_id"} <= set(ds.column_names)
    assert list(ds["source_id"][:10]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_tokenize_pairs(tiny_tok):
    train = {"a": _src("a", 6, {"margin": [0.5] * 6}), "b": _src("b", 6, {"margin": [1.0] * 6})}
    long_prompt = "\n\nHuman: " + "word " * 60 + "\n\nAssistant:"
    train["a"] = train["a"].map(lambda r, i: {"prompt": long_prompt if i < 2 else r["prompt"]}, with_indices=True)
    ds = mix(train, "balanced", per_source_batch=2, seed=0)
    out, n_cut = tokenize_pairs(ds, tiny_tok, max_length=16)
    assert set(out.column_names) == {"source_id", "margin", "chosen_ids", "rejected_ids"}
    assert out["source_id"] == ds["source_id"] and out["margin"] == ds["margin"]
    ref_c, _ = encode_left(tiny_tok, [p + c for p, c in zip(ds["prompt"], ds["chosen"])], 16)
    assert out["chosen_ids"] == ref_c
    full = [encode_left(tiny_tok, [p + x], None)[0][0] for p, x in zip(ds["prompt"], ds["chosen"])]
    full_r = [encode_left(tiny_tok, [p + x], None)[0][0] for p, x in zip(ds["prompt"], ds["rejected"])]
    assert n_cut == sum(len(a) > 16 or len(b) > 16 for a, b in zip(full, full_r)) == 2
    for ids, f in zip(out["chosen_ids"], full):
        assert ids == f[-len(ids) :] and ids[-1] == tiny_tok.eos_token_id
    kept, _ = tokenize_pairs(ds, tiny_tok, max_length=None, keep_text=True)
    assert {"prompt", "chosen", "rejected", "source"} <= set(kept.column_names)
    # no prompt column: TRL's implicit-prompt layout, chosen/rejected are the whole texts
    implicit, _ = tokenize_pairs(ds.remove_columns("prompt"), tiny_tok, 16)
    assert implicit["chosen_ids"] == encode_left(tiny_tok, ds["chosen"], 16)[0]
    with pytest.raises(ValueError, match="no 'chosen' column"):
        tokenize_pairs(ds.remove_columns("chosen"), tiny_tok, 16)


def test_load_stats_count_and_name_every_dropped_group(tmp_path):
    """Issue 28, item 10: "dropped: other_group 165" counted the drop_groups rows without naming a group, and a
    group found only in the declared test split vanished without a count."""
    import json

    from pipeline.data.mixing import data_stats, describe_data_stats

    def rows(groups: dict[str, int], tag: str):
        return [
            {"prompt": f"q {tag} {g} {i}", "chosen": f"yes {i}", "rejected": f"no {i}", "g": g}
            for g, n in groups.items()
            for i in range(n)
        ]

    d = tmp_path / "grouped"
    d.mkdir()
    train = rows({"a": 12, "b": 10, "c": 3}, "train")
    test = rows({"a": 4, "b": 4, "c": 1, "z": 5}, "test")  # z has no train pairs
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (d / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test) + "\n")
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps(r) for r in rows({"a": 9, "d": 2, "e": 1}, "k")))
    specs = [
        SourceSpec(
            name="g",
            format="jsonl",
            path=str(d),
            split="train",
            test_split="test",
            options={"group_by": "g", "drop_groups": ["c"]},
        ),
        SourceSpec(
            name="k", format="jsonl", path=str(tmp_path / "one.jsonl"), options={"group_by": "g", "keep_groups": ["a"]}
        ),
    ]
    splits = build_splits(DataConfig(sources=specs, valid_fraction=0.0))
    assert set(splits) == {"g/a", "g/b", "k/a"}
    lines = describe_data_stats(data_stats(splits))
    assert "groups dropped: by drop_groups 4 pairs (c 4); no train pairs 5 pairs (g/z 5)" in lines[0]  # 3 + 1 of c
    assert "groups dropped: not in keep_groups 3 pairs (d 2, e 1)" in lines[2]
