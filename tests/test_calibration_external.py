"""Calibration of reward models NOT trained in the run (calibration.external_rms) and paired comparisons.

The distributed test launches THIS file as the worker script:
    PYTHONPATH=. torchrun --nproc_per_node 2 tests/test_calibration_external.py RUN_DIR RM_ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.calibration.stage import run
from tests.helpers import REPO, calibration_recipe, pipeline_cli, save_tiny_rm, subprocess_env, torchrun_worker


RMS = ("more", "multitask")


def _flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, d


def assert_same_numbers(a, b, atol=1e-6):
    fa, fb = dict(_flat(a)), dict(_flat(b))
    assert set(fa) == set(fb)
    for k, v in fa.items():
        if isinstance(v, float):
            # relative too: a fitted temperature on a near-flat likelihood (T in the thousands) moves by
            # a few 1e-6 relative when the scores move by 1e-7 (summation order across ranks)
            assert fb[k] == pytest.approx(v, abs=atol, rel=1e-5), k
        else:
            assert fb[k] == v, k


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tok):
    """A run dir whose reward/index.json lists two RMs, evaluated by the calibration stage as usual."""
    root = tmp_path_factory.mktemp("trained")
    index = {}
    for i, name in enumerate(RMS):
        save_tiny_rm(tiny_tok, root / "reward" / name, seed=10 + i, head_scale=15.0)
        index[name] = {"path": name, "method": name, "sources": ["helpful", "harmless", "webgpt"]}
    (root / "reward" / "index.json").write_text(json.dumps(index))
    run(calibration_recipe(), root)
    return root


def _external(root: Path) -> dict:
    return {n: str(root / "reward" / n) for n in RMS}


def test_external_only_run_equals_the_trained_run(trained, tmp_path):
    stamps = {n: (trained / "reward" / n / "temperature.json").read_text() for n in RMS}
    out = tmp_path / "fresh"
    artifacts = run(calibration_recipe(external_rms=_external(trained)), out)  # no reward/ in this directory at all
    assert "calibration/comparisons.json" in artifacts and not (out / "reward").exists()
    for f in ("metrics.json", "temperatures.json", "temperature_fits.json"):
        assert_same_numbers(
            json.loads((trained / "calibration" / f).read_text()), json.loads((out / "calibration" / f).read_text())
        )
    # same pairs, same seed: the comparison of the two is the same as well
    assert_same_numbers(
        json.loads((trained / "calibration" / "comparisons.json").read_text()),
        json.loads((out / "calibration" / "comparisons.json").read_text()),
    )
    # an external RM directory belongs to the user: nothing is written into it
    assert {n: (trained / "reward" / n / "temperature.json").read_text() for n in RMS} == stamps
    cfg = json.loads((out / "calibration" / "config.json").read_text())
    assert cfg["external"] == _external(trained) and cfg["comparisons"] == ["more vs multitask"]
    assert "| more |" in (out / "calibration" / "table.md").read_text()
    assert (out / "calibration" / "reliability.png").exists()


def test_comparisons_json_schema_and_values(trained):
    comps = json.loads((trained / "calibration" / "comparisons.json").read_text())
    metrics = json.loads((trained / "calibration" / "metrics.json").read_text())
    assert list(comps) == ["more vs multitask"]  # the default when both exist
    groups = comps["more vs multitask"]
    assert list(groups) == ["helpful", "harmless", "webgpt", "all_average", "hh_average"]
    keys = [
        "ece_10",
        "accuracy",
        "brier",
        "nll",
        "temperature_scaled/ece_10",
        "temperature_scaled/brier",
        "temperature_scaled/nll",
        "truth/prob_mae",
        "truth_gold/prob_mae",
    ]
    for group, by_metric in groups.items():
        assert list(by_metric) == keys
        for key, e in by_metric.items():
            assert set(e) == {"a", "b", "diff", "ci95", "p_value"}
            assert e["diff"] == pytest.approx(e["a"] - e["b"], abs=1e-12)
            assert e["ci95"][0] <= e["ci95"][1] and 0 <= e["p_value"] <= 1
            path = key.split("/")
            ma, mb = metrics["more"][group], metrics["multitask"][group]
            for p in path:
                ma, mb = ma[p], mb[p]
            assert e["a"] == pytest.approx(ma, abs=1e-9) and e["b"] == pytest.approx(mb, abs=1e-9), (group, key)
    md = (trained / "calibration" / "comparisons.md").read_text()
    assert "## more vs multitask" in md and "| all_average |" in md


def test_peft_adapter_is_loaded_on_its_base(tmp_path, tiny_tok, one_thread):
    """A SEQ_CLS LoRA adapter directory (no tokenizer of its own) scores like the merged model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    save_tiny_rm(tiny_tok, base_dir, seed=3, head_scale=10.0)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    model = get_peft_model(
        base,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=4,
            lora_alpha=8,
            target_modules=["query_key_value"],
            modules_to_save=["score"],
        ),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)  # a non-trivial adapter and head
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    model.merge_and_unload().save_pretrained(merged_dir)
    tiny_tok.save_pretrained(merged_dir)
    recipe = calibration_recipe(
        external_rms={"adapter": str(adapter_dir), "merged": str(merged_dir)},
        compare=["adapter vs merged"],
        bootstrap_samples=5,
    )
    run(recipe, tmp_path / "run")
    scores = np.load(tmp_path / "run" / "calibration" / "scores.npz")
    for key in scores.files:
        if key.startswith("adapter::"):
            np.testing.assert_allclose(scores[key], scores[key.replace("adapter::", "merged::")], atol=1e-5)
            assert np.ptp(scores[key]) > 0
    comps = json.loads((tmp_path / "run" / "calibration" / "comparisons.json").read_text())
    assert abs(comps["adapter vs merged"]["all_average"]["ece_10"]["diff"]) < 1e-5


def test_unsupported_models_and_bad_names_fail_clearly(tmp_path, tiny_tok, trained):
    from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXForCausalLM

    small = dict(
        vocab_size=len(tiny_tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=tiny_tok.pad_token_id,
    )
    three_way = AutoModelForSequenceClassification.from_config(GPTNeoXConfig(**small, num_labels=3))
    three_way.save_pretrained(tmp_path / "3way")
    GPTNeoXForCausalLM(GPTNeoXConfig(**small)).save_pretrained(tmp_path / "lm")
    (tmp_path / "lora-lm").mkdir()
    (tmp_path / "lora-lm" / "adapter_config.json").write_text(
        json.dumps({"task_type": "CAUSAL_LM", "base_model_name_or_path": "x"})
    )
    out = tmp_path / "run"
    cases = [
        (
            "3way",
            r"external reward model 'x' \(.*3way\): its head has num_labels=3 outputs, not a single scalar "
            r"reward. Supported: a scalar-head sequence classifier",
        ),
        ("lm", r"it is a GPTNeoXForCausalLM checkpoint, not a sequence classifier .* Supported:"),
        ("lora-lm", r"PEFT adapter with task_type 'CAUSAL_LM', not SEQ_CLS .* Supported:"),
    ]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            run(calibration_recipe(external_rms={"x": str(tmp_path / name)}), out)
    with pytest.raises(
        FileNotFoundError,
        match=r"calibration.external_rms.x: ./nowhere/at all is neither an existing "
        r"directory nor a hub id",
    ):
        run(calibration_recipe(external_rms={"x": "./nowhere/at all"}), out)
    # a name clash with a trained RM of the run
    with pytest.raises(ValueError, match="the name 'more' is already used by a reward model trained in this run"):
        run(calibration_recipe(external_rms={"more": str(trained / "reward" / "more")}), trained)
    # an unknown RM in compare fails before anything is scored or written
    with pytest.raises(
        ValueError,
        match=r"calibration.compare: 'more vs nope' names 'nope', which this run does not "
        r"evaluate; the RMs evaluated here are: more",
    ):
        run(calibration_recipe(external_rms={"more": str(trained / "reward" / "more")}, compare=["more vs nope"]), out)
    with pytest.raises(ValueError, match="is not a comparison"):
        calibration_recipe(compare=["more versus multitask"])
    with pytest.raises(ValueError, match=r"RM names \['my rm'\] may only hold"):
        calibration_recipe(external_rms={"my rm": str(tmp_path)})
    assert not (out / "calibration").exists()


@pytest.mark.slow
def test_done_two_trained_rms_evaluated_by_one_command(tmp_path):
    """The issue's 'done': RMs trained by the real reward stage in one run, then a fresh directory that only holds
    them as external RMs, evaluated by one `pipeline.run --stages calibration,report` into metrics.json /
    comparisons.json / report.md, each RM's numbers identical to those of the run that trained it."""
    small = [
        "data.synthetic.n_train=40",
        "data.synthetic.n_valid=20",
        "data.synthetic.n_test=24",
        "calibration.bootstrap_samples=30",
        "calibration.progress=false",
        "reward.methods=[more,multitask]",
    ]
    env = subprocess_env(REPO, keep_pythonpath=False, OMP_NUM_THREADS="1")

    def pipeline(out, stages, *extra):
        p = pipeline_cli("tiny-cpu", out, "--stages", stages, *small, *extra, env=env)
        assert p.returncode == 0, p.stderr[-4000:]

    trained, fresh = tmp_path / "trained", tmp_path / "fresh"
    pipeline(trained, "reward,calibration,report")
    ext = "{" + ", ".join(f"{n}: {trained / 'reward' / n}" for n in RMS) + "}"
    pipeline(fresh, "calibration,report", f"calibration.external_rms={ext}")
    written = sorted(p.name for p in fresh.iterdir() if not p.name.startswith("."))  # .lock is the run lock
    assert written == ["calibration", "manifest.json", "recipe.yaml", "report.json", "report.md"]
    for f in ("metrics.json", "comparisons.json", "temperatures.json"):
        mine = json.loads((trained / "calibration" / f).read_text())
        if f == "comparisons.json":  # each trained RM vs its step 0: only where it was trained
            mine = {k: v for k, v in mine.items() if "@step0" not in k}
        assert_same_numbers(mine, json.loads((fresh / "calibration" / f).read_text()))
    no_start = json.loads((fresh / "calibration" / "step0.json").read_text())["no_reference"]
    assert no_start == dict.fromkeys(
        RMS, "an external RM (calibration.external_rms): where its training began is not known"
    )
    md = (fresh / "report.md").read_text()
    comps = json.loads((fresh / "calibration" / "comparisons.json").read_text())["more vs multitask"]
    assert "Evaluated, not trained here (`calibration.external_rms`): more" in md
    assert "- more: no step-0 reference (an external RM (calibration.external_rms): where its training began" in md
    assert "## Paired comparisons" not in md and "### more vs multitask" in md
    # 'better' appears only in a sentence whose interval excludes 0
    for line in md.splitlines():
        if "better here" in line:
            assert "lower than" in line or "higher than" in line
    sentences = json.loads((fresh / "report.json").read_text())["sentences"]
    for s in sentences:
        assert ("better" in s) == ("no significant difference" not in s), s
    ece = comps["all_average"]["ece_10"]
    lo, hi = ece["ci95"]
    expected = "MORE's is" if lo > 0 or hi < 0 else "no significant difference between MORE and MultiTask"
    assert any(s.startswith("ECE (M=10), all sources: " + expected) for s in sentences)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_score_external_rms_like_one(trained, tmp_path):
    """Under torchrun (gloo, 2 CPU ranks) each rank scores a shard of every split; rank 0 gathers and writes the
    same metrics as the single-process run."""
    single = tmp_path / "single"
    run(calibration_recipe(external_rms=_external(trained)), single)
    out = tmp_path / "multi"
    ranks = torchrun_worker(Path(__file__).resolve(), out, trained, timeout=300)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["artifacts"] and ranks[1]["artifacts"] == []  # only the main process writes
    a, b = np.load(single / "calibration" / "scores.npz"), np.load(out / "calibration" / "scores.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=1e-5)
    for f in ("metrics.json", "comparisons.json"):
        assert_same_numbers(
            json.loads((single / "calibration" / f).read_text()), json.loads((out / "calibration" / f).read_text())
        )


if __name__ == "__main__":  # the torchrun worker of the distributed test
    from accelerate import PartialState

    out, rm_root = Path(sys.argv[1]), Path(sys.argv[2])
    artifacts = run(calibration_recipe(external_rms=_external(rm_root)), out)
    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(
        json.dumps({"world": state.num_processes, "artifacts": artifacts})
    )
    from pipeline.dist import shutdown_distributed

    shutdown_distributed()  # deterministic teardown: no rank may abort at interpreter exit


@pytest.mark.real_data
def test_rm_eval_recipe_on_the_real_sources(real_data_dir, trained, tmp_path):
    """The rm-eval recipe: external RMs only, the five real sources' test data, calibration + report, no training."""
    import pipeline.config as C
    from pipeline.run import run_pipeline

    ext = "{" + ", ".join(f"{n}: {trained / 'reward' / n}" for n in RMS) + "}"
    recipe = C.load_recipe(
        "rm-eval",
        [
            f"data_root={real_data_dir}",
            f"calibration.external_rms={ext}",
            "calibration.compare=[multitask vs more]",
            "calibration.max_pairs_per_split=6",
            "calibration.bootstrap_samples=20",
            "calibration.dtype=fp32",
            "calibration.progress=false",
            "calibration.plots=false",
            "data.max_length=64",
        ],
    )
    assert recipe.stages == ["calibration", "report"]
    manifest = run_pipeline(recipe, tmp_path / "run")
    assert manifest["stages"]["calibration"]["status"] == "done" and not (tmp_path / "run" / "reward").exists()
    metrics = json.loads((tmp_path / "run" / "calibration" / "metrics.json").read_text())
    assert list(metrics) == ["more", "multitask"]
    assert list(metrics["more"])[:5] == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    assert all(metrics["more"][s]["n_pairs"] == 6 for s in ("helpful", "harmless", "oasst1", "webgpt", "summarize"))
    comps = json.loads((tmp_path / "run" / "calibration" / "comparisons.json").read_text())
    assert list(comps) == ["multitask vs more"] and "hh_average" in comps["multitask vs more"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "MultiTask" in md and "## Calibration" in md


def test_an_rm_folder_without_tokenizer_files_is_refused_before_any_work(tmp_path, tiny_tok):
    """Issue 29, item 1: a folder with config.json and weights but no tokenizer files was scored with the empty
    tokenizer transformers builds from config.json alone (vocabulary 2, every text encoded to []): exit 0, every
    pair a tie, accuracy 0.5, ECE 0.0. Now --dry-run and the stage refuse it, naming the folder and the files;
    a SEQ_CLS adapter without a tokenizer whose base has none is refused the same way."""
    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.models import ModelLoadError, load_tokenizer
    from pipeline.run import run_pipeline

    bare = tmp_path / "bare"
    save_tiny_rm(tiny_tok, bare, seed=1, head_scale=5.0)
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    missing = rf"calibration.external_rms.x: {bare} has no tokenizer files \(none of tokenizer.json, .*vocab.json"
    out = tmp_path / "run"
    with pytest.raises(ModelLoadError, match=missing):
        run(calibration_recipe(external_rms={"x": str(bare)}), out)
    assert not (out / "calibration").exists()
    recipe = load_recipe("tiny-cpu", [f"calibration.external_rms={{x: {bare}}}"])
    with pytest.raises(RecipeError, match=missing + r".*Fix: save the tokenizer there too"):
        run_pipeline(recipe, out, stages=["calibration"], dry_run=True)
    with pytest.raises(ModelLoadError, match=rf"tokenizer: {bare} has no tokenizer files"):
        load_tokenizer(str(bare))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": str(bare)})
    )
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=rf"calibration.external_rms.a: {bare} has no tokenizer files"):
        run(calibration_recipe(external_rms={"a": str(adapter)}), out)


def test_an_rm_without_a_pad_id_padding_with_eos_is_warned_about(tmp_path, tiny_tok, capsys):
    """An external RM whose config.json has no pad_token_id and whose tokenizer has no pad token: EOS becomes
    the pad id, so the reward is read at the token before the appended EOS (accuracy 0.650 instead of 0.7125
    for weights trained reading it at the EOS). The calibration stage says so, naming the RM and the fix; an RM
    with its own pad id is loaded silently."""
    import copy

    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.load import load_rm

    save_tiny_rm(tiny_tok, tmp_path / "padded", seed=1, head_scale=1.0)
    tok = copy.deepcopy(tiny_tok)
    tok.pad_token = None
    save_tiny_rm(tok, tmp_path / "no-pad", seed=1, head_scale=1.0)
    config = json.loads((tmp_path / "no-pad" / "config.json").read_text())
    config.pop("pad_token_id", None)
    (tmp_path / "no-pad" / "config.json").write_text(json.dumps(config))
    cfg = CalibrationConfig()
    model, loaded = load_rm("ext", {"path": str(tmp_path / "no-pad"), "external": True}, cfg, "cpu")
    assert model.config.pad_token_id == loaded.eos_token_id
    out = capsys.readouterr().out
    assert (
        f"[calibration] warning: reward model 'ext' ({tmp_path / 'no-pad'}): its config.json has no pad_token_id"
        in out
    )
    assert "the reward is read at the token BEFORE it" in out and "set pad_token_id in its config.json" in out
    load_rm("ok", {"path": str(tmp_path / "padded"), "external": True}, cfg, "cpu")
    assert "warning" not in capsys.readouterr().out
