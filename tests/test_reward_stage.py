"""The reward stage end to end on the synthetic benchmark: RMs saved, index written, reruns skip."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.data import DataConfig
from pipeline.reward import fingerprint, stage
from pipeline.reward import index as index_mod
from pipeline.reward.config import RewardStageConfig
from tests.helpers import one_rm_recipe, reward_recipe


def test_reward_stage_trains_saves_and_skips(tmp_path, capsys):
    recipe = reward_recipe()
    artifacts = stage.run(recipe, tmp_path)
    index = json.loads((tmp_path / "reward" / "index.json").read_text())
    assert set(index) == {"more", "multitask"}
    assert index["more"]["sources"] == ["helpful", "harmless", "oasst1", "webgpt", "summarize"]
    assert "reward/more" in artifacts
    for name in index:
        d = tmp_path / "reward" / name
        rm = AutoModelForSequenceClassification.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert rm(**tok(["\n\nHuman: hi\n\nAssistant: hello"], return_tensors="pt")).logits.shape == (1, 1)
        assert name in (d / "README.md").read_text()
    log = json.loads((tmp_path / "reward" / "more" / "train_log.json").read_text())
    assert any("more/lambda/webgpt" in h for h in log)
    assert not list((tmp_path / "reward").glob(".*.partial"))
    capsys.readouterr()
    stage.run(recipe, tmp_path)
    assert capsys.readouterr().out.count("already trained, skipping") == 2


def test_reward_stage_single_source_rms(tmp_path):
    recipe = reward_recipe(methods=["single"])
    recipe.data.sources = recipe.data.sources[:2]
    stage.run(recipe, tmp_path)
    index = json.loads((tmp_path / "reward" / "index.json").read_text())
    assert set(index) == {"single-helpful", "single-harmless"}
    assert index["single-helpful"] == {
        "path": "reward/single-helpful",
        "method": "single",
        "sources": ["helpful"],
        "train_prompts": "reward/single-helpful/train_prompts.json",
    }


def test_reward_stage_records_training_prompts_and_dropped_pairs(tmp_path, capsys):
    """Issue 19: every RM records the hashes of its training prompts; issue 17: dropped-pair counts are printed
    and stored in the run directory (they were only logged at INFO level, never shown nor kept)."""
    from pipeline.data import SourceSpec, build_splits
    from pipeline.data.mixing import prompt_hash, read_train_prompts

    rows = [{"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": " no"} for i in range(60)]
    rows += [{"prompt": "\n\nHuman: same?\n\nAssistant:", "chosen": " x", "rejected": " x"}] * 3  # identical: dropped
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = reward_recipe(methods=["multitask"])
    recipe.data = DataConfig(
        sources=[SourceSpec(name="mine", format="jsonl", path=str(path), split=None)],
        per_source_batch=2,
        max_length=8,
        test_fraction=0.2,
    )
    run_dir = tmp_path / "run"
    artifacts = stage.run(recipe, run_dir)
    out = capsys.readouterr().out
    assert "[reward] data mine: train/validation/test = " in out and "63 records read, dropped: identical 3" in out
    stats = json.loads((run_dir / "reward" / "data_stats.json").read_text())
    assert "reward/data_stats.json" in artifacts
    assert stats["sources"]["mine"]["dropped"] == {"identical": 3}
    assert stats["sources"]["mine"]["loaded"][0]["records"] == 63
    assert stats["over_length_pairs"]["per_rm"]["multitask"] > 0  # max_length=8 cuts every pair
    # the pipeline turns left truncation on explicitly (the trainer alone drops long pairs, as TRL does)
    assert "kept, cut from the left (reward.train.truncation=left" in stats["over_length_pairs"]["note"]
    info = json.loads((run_dir / "reward" / "multitask" / "reward_info.json").read_text())
    assert info["truncation"] == "left" and info["max_length"] == 8 and info["n_dropped_pairs"] == 0
    assert info["n_truncated_sequences"] == stats["over_length_pairs"]["per_rm"]["multitask"]
    splits = build_splits(recipe.data)["mine"]
    assert sum(stats["sources"]["mine"]["pairs"].values()) == 60
    recorded = read_train_prompts(run_dir / "reward" / "multitask")
    assert recorded == {prompt_hash(p) for p in splits["train"]["prompt"]}
    assert not recorded & {prompt_hash(p) for p in [*splits["test"]["prompt"], *splits["validation"]["prompt"]]}
    index = json.loads((run_dir / "reward" / "index.json").read_text())
    assert (run_dir / index["multitask"]["train_prompts"]).is_file()
    # an RM trained before the record existed gets it on the next (skipping) run, without retraining
    rm_dir = run_dir / "reward" / "multitask"
    (rm_dir / "train_prompts.json").unlink()
    fp = json.loads((rm_dir / "fingerprint.json").read_text())
    del fp["files"]["train_prompts.json"]
    (rm_dir / "fingerprint.json").write_text(json.dumps(fp))
    stage.run(recipe, run_dir)
    assert "already trained, skipping" in capsys.readouterr().out
    assert read_train_prompts(run_dir / "reward" / "multitask") == recorded

    # end to end (issue 19): this run's RM evaluated as an external RM on its own training file, cut 80/15 under
    # another source name, reports the overlap and is scored on the held-out prompts only
    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.stage import run as calibrate

    eval_data = DataConfig(
        sources=[SourceSpec(name="renamed", format="jsonl", path=str(path), split=None)],
        max_length=8,
        test_fraction=0.8,
        valid_fraction=0.15,
    )
    cal = CalibrationConfig(
        external_rms={"theirs": str(rm_dir)}, temperature_scaling=False, bootstrap_samples=0, plots=False
    )
    calibrate(SimpleNamespace(name="eval", seed=0, data=eval_data, calibration=cal), tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "calibration" / "metrics.json").read_text())
    test = build_splits(eval_data)["renamed"]["test"]
    n_seen = sum(prompt_hash(p) in recorded for p in test["prompt"])
    assert n_seen > 0 and metrics["theirs"]["train_overlap"]["test"] == {"renamed": n_seen}
    assert metrics["theirs"]["renamed"]["n_pairs"] == len(test) - n_seen


def test_reward_stage_config_errors():
    with pytest.raises(ValueError, match="methods"):
        RewardStageConfig(methods=["mgda"])
    with pytest.raises(ValueError, match="learning_rat"):
        RewardStageConfig(train={"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="peft"):
        RewardStageConfig(peft="qlora3")


def _weights(d):
    # cloned: load_file memory-maps the file, and a test that truncates it in place would change these tensors
    return {k: v.clone() for k, v in load_file(str(d / "model.safetensors")).items()}


def test_changed_setting_retrains_same_setting_skips_force_retrains(tmp_path, capsys):
    """Defect 1: a changed reward.train.learning_rate must retrain (new weights, new card), not reuse; the same
    config reuses; a truncated weights file (defect 11) or force=True (--force reward) retrains."""
    stage.run(one_rm_recipe(), tmp_path)
    rm = tmp_path / "reward" / "more"
    w1 = _weights(rm)
    capsys.readouterr()

    stage.run(one_rm_recipe(learning_rate=5e-2), tmp_path)
    out = capsys.readouterr().out
    assert "already trained" not in out
    assert "train_args.learning_rate: 0.001 -> 0.05" in out  # says why
    w2 = _weights(rm)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert "Learning rate 0.05" in (rm / "README.md").read_text()
    assert json.loads((rm / "fingerprint.json").read_text())["inputs"]["train_args"]["learning_rate"] == 0.05

    stage.run(one_rm_recipe(learning_rate=5e-2), tmp_path)  # same config: reused
    assert "more: already trained, skipping" in capsys.readouterr().out
    assert all(torch.equal(w2[k], v) for k, v in _weights(rm).items())

    # Defect 11: a truncated model.safetensors is not up to date
    data = (rm / "model.safetensors").read_bytes()
    (rm / "model.safetensors").write_bytes(data[: len(data) // 2])
    stage.run(one_rm_recipe(learning_rate=5e-2), tmp_path)
    out = capsys.readouterr().out
    assert "model.safetensors (size" in out and "already trained" not in out
    assert all(torch.equal(w2[k], v) for k, v in _weights(rm).items())  # same inputs, same seed: same RM

    mtime = (rm / "model.safetensors").stat().st_mtime_ns
    stage.run(one_rm_recipe(learning_rate=5e-2), tmp_path, force=True)  # --force reward
    assert "forced" in capsys.readouterr().out
    assert (rm / "model.safetensors").stat().st_mtime_ns != mtime
    assert all(torch.equal(w2[k], v) for k, v in _weights(rm).items())


def test_changed_training_data_or_tiny_base_retrains(tmp_path, capsys):
    stage.run(one_rm_recipe(), tmp_path)
    capsys.readouterr()
    recipe = one_rm_recipe()
    recipe.data.n_train_per_source = 8  # other training rows
    recipe.reward.tokenizer_vocab_size = 300  # another tokenizer: .base is rebuilt, the RM retrained
    stage.run(recipe, tmp_path)
    out = capsys.readouterr().out
    assert "rebuilding reward/.base" in out
    assert "train_data_sha256" in out and "reward.tokenizer_vocab_size: 400 -> 300" in out
    tok = json.loads((tmp_path / "reward" / "more" / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) <= 300


def test_half_written_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, monkeypatch):
    """Defect 2: a disk-full during checkpoint-4 leaves it without trainer_state.json; the rerun resumes from
    checkpoint-2 (saying so), deletes the broken one, and ends with the RM of an uninterrupted run."""
    from transformers import Trainer

    train = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    stage.run(one_rm_recipe(**train), tmp_path / "full")
    want = _weights(tmp_path / "full" / "reward" / "more")

    run_dir = tmp_path / "cut"
    orig = Trainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(28, "No space left on device")
        return orig(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", disk_full)
    with pytest.raises(OSError):
        stage.run(one_rm_recipe(**train), run_dir)
    monkeypatch.undo()
    ckpts = run_dir / "reward" / ".checkpoints" / "more"
    assert (ckpts / "checkpoint-4").is_dir() and not (ckpts / "checkpoint-4" / "trainer_state.json").exists()
    capsys.readouterr()
    stage.run(one_rm_recipe(**train), run_dir)
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint checkpoint-4" in out
    assert "resuming from" in out and "checkpoint-2" in out
    got = _weights(run_dir / "reward" / "more")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_other_inputs_are_not_resumed(tmp_path, capsys, monkeypatch):
    train = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}

    from pipeline.reward.trainer import MORERewardTrainer

    orig = MORERewardTrainer._save_checkpoint

    def save_then_stop(self, model, trial):
        orig(self, model, trial)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(MORERewardTrainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        stage.run(one_rm_recipe(**train), tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "reward" / ".checkpoints" / "more" / "checkpoint-2").is_dir()
    capsys.readouterr()
    stage.run(one_rm_recipe(learning_rate=5e-2, **train), tmp_path)
    out = capsys.readouterr().out
    assert "discarding checkpoints" in out and "resuming" not in out


def test_copied_run_directory_is_independent(tmp_path):
    """Defect 4: `cp -a D D2`, rerun calibration in D2: D is untouched, D2's artifacts stay inside D2."""
    from pipeline.calibration.config import CalibrationConfig
    from pipeline.calibration.stage import run as calibrate

    recipe = one_rm_recipe()
    d = tmp_path / "D"
    stage.run(recipe, d)
    index = json.loads((d / "reward" / "index.json").read_text())
    assert index["more"]["path"] == "reward/more"
    shutil.copytree(d, tmp_path / "D2", symlinks=True)
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    recipe.calibration = CalibrationConfig(dtype="fp32", bootstrap_samples=0, progress=False, plots=False)
    d2 = tmp_path / "D2"
    artifacts = calibrate(recipe, d2.resolve())
    assert (d2 / "reward" / "more" / "temperature.json").is_file()
    assert not (d / "reward" / "more" / "temperature.json").exists()
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before
    assert all(not a.startswith("/") for a in artifacts)
    # an index written by an older version (absolute paths into D) is read as D2's own RMs
    index["more"]["path"] = str((d / "reward" / "more").resolve())
    (d2 / "reward" / "index.json").write_text(json.dumps(index))
    assert index_mod.resolve_rm_path(d2, "more", index["more"]["path"]) == (d2 / "reward" / "more").resolve()


def test_rm_fingerprints_of_fixed_inputs_are_pinned(tmp_path, monkeypatch):
    """The fingerprints of an RM and of the tiny base, for fixed inputs, as the code computed them before the
    stage was split into modules: a change of their payload would retrain every saved RM (and rebuild every
    tiny base), so it must come with a TRAINING_CODE_VERSION bump and a new pin, never by accident."""
    from datasets import Dataset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU defaults enter the train args
    recipe = one_rm_recipe(learning_rate=5e-2)
    rows = {
        s: Dataset.from_dict(
            {
                "prompt": [f"\n\nHuman: {s} question {i}\n\nAssistant:" for i in range(8)],
                "chosen": [f" good answer {i}" for i in range(8)],
                "rejected": [f" bad answer {i}" for i in range(8)],
                "source": [s] * 8,
            }
        )
        for s in ("helpful", "harmless")
    }
    splits = {s: {"train": d} for s, d in rows.items()}
    tok = SimpleNamespace(
        get_vocab=lambda: {"a": 0, "b": 1, "<eos>": 2},
        special_tokens_map={"eos_token": "<eos>", "pad_token": "<eos>"},
        padding_side="right",
        chat_template="{{ messages }}",
    )
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    (base / "model.safetensors").write_bytes(bytes(range(64)))
    (base / "fingerprint.json").write_text(json.dumps({"fingerprint": "abc"}))
    plan = fingerprint.plan_rm(recipe, tmp_path, "more", "more", ["helpful", "harmless"], splits, tok, str(base))
    assert plan.inputs["training_code_version"] == fingerprint.TRAINING_CODE_VERSION == 3
    assert plan.fingerprint == "4bf4f5d39297ea4a4a3b1b059347b200c672c9c05522bf489cc0c29859aaf266"
    assert fingerprint.tiny_base_fingerprint(recipe, ["one text", "another text"]) == (
        "9ddfcc174d9f89ef275b2be73fc46bf455bbf000d85d59ac4e855fb7758d587e"
    )


def test_an_rm_of_an_older_training_code_version_is_retrained_with_the_versions_note(tmp_path):
    """One training-code version bump per wave of fingerprint changes, and its one-line reason names it."""
    out = tmp_path / "rm"
    out.mkdir()
    (out / "reward_info.json").write_text("{}")
    (out / fingerprint.FINGERPRINT).write_text(
        json.dumps({"fingerprint": "old", "inputs": {"training_code_version": 2}, "files": {}})
    )
    plan = SimpleNamespace(fingerprint="new", inputs={"training_code_version": fingerprint.TRAINING_CODE_VERSION})
    reason = fingerprint.stale_reason(out, plan)
    assert reason.startswith(f"trained by training-code version 2, now {fingerprint.TRAINING_CODE_VERSION}: ")
    assert fingerprint.VERSION_NOTES[fingerprint.TRAINING_CODE_VERSION] in reason and "truncation" in reason


def test_a_base_model_without_tokenizer_files_is_refused(tmp_path, tiny_tok):
    """Issue 29, item 1: reward.model_name_or_path naming a folder without tokenizer files trained an RM at loss
    ln 2 for every step (every text encoded to no tokens) and called it done. Now --dry-run and the stage refuse
    it before any training, naming the folder and the missing files."""
    from pipeline.config import load_recipe
    from pipeline.errors import RecipeError
    from pipeline.models import ModelLoadError
    from pipeline.run import run_pipeline
    from tests.helpers import save_tiny_rm

    bare = tmp_path / "bare"
    save_tiny_rm(tiny_tok, bare, seed=1, head_scale=1.0)
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    missing = rf"reward.model_name_or_path: {bare} has no tokenizer files \(none of tokenizer.json"
    recipe = load_recipe("tiny-cpu", [f"reward.model_name_or_path={bare}"])
    with pytest.raises(RecipeError, match=missing + ".*in the command-line override"):
        run_pipeline(recipe, tmp_path / "run", stages=["reward"], dry_run=True)
    recipe = one_rm_recipe()
    recipe.reward.model_name_or_path = str(bare)
    with pytest.raises(ModelLoadError, match=missing):
        stage.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "reward").exists()


def test_a_per_source_batch_larger_than_the_smallest_source_is_refused(tmp_path, capsys):
    """Issue 29, item 6: reward.methods=[more] data.per_source_batch=1000000 with sources of ~38 training pairs
    made no progress for minutes while memory grew (every source resampled to a million pairs). Now --dry-run
    and the stage refuse it before anything is mixed, naming both numbers; with n_train_per_source set, the
    recipe load does."""
    from pipeline.errors import RecipeError
    from pipeline.run import main

    args = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--stages", "reward", "--dry-run"]
    over = ["reward.methods=[more]", "data.per_source_batch=1000000", "data.synthetic.n_train=38"]
    assert main([*args, *over]) == 2
    err = capsys.readouterr().err
    assert "data.per_source_batch = 1000000 is larger than the smallest source's training pairs" in err
    assert "38 pairs" in err and "Fix: set data.per_source_batch <= 38" in err and "Traceback" not in err
    assert main([*args, "data.per_source_batch=100", "data.n_train_per_source=40"]) == 2
    assert "data.per_source_batch = 100 is larger than data.n_train_per_source = 40" in capsys.readouterr().err

    recipe = one_rm_recipe()
    recipe.data.n_train_per_source = None
    recipe.data.per_source_batch = 1000
    with pytest.raises(RecipeError, match=r"data.per_source_batch = 1000 is larger .*\('helpful': 48 pairs\)"):
        stage.run(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "reward").exists()
