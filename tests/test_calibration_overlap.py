"""Issue 19: evaluation pairs whose prompt an RM was trained on are counted, reported and excluded.

The scenario of the issue: RMs trained on a file (test/validation cut 10%/5% by prompt) evaluated as external
RMs by an rm-eval-style recipe that cuts the same file, under another source name, into 80% test pairs, so most
of its "test" prompts are the RM's training prompts.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.calibration import metrics as M
from pipeline.calibration.stage import run
from pipeline.data import DataConfig, SourceSpec, build_splits
from pipeline.data.mixing import TRAIN_PROMPTS, prompt_hash, train_prompts_record
from pipeline.report.calibration_section import train_overlap_line
from tests.helpers import calibration_recipe, save_tiny_rm


N_PROMPTS = 120


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_tok):
    """A data file, and an RM directory whose train_prompts.json holds the training prompts of a run with
    test_fraction 0.1 / valid_fraction 0.05 on it (what the reward stage writes: see test_reward_stage)."""
    root = tmp_path_factory.mktemp("overlap")
    data = root / "pairs.jsonl"
    with open(data, "w") as f:
        for i in range(N_PROMPTS):
            rec = {"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "chosen": f" yes {i}", "rejected": " no"}
            f.write(json.dumps(rec) + "\n")
    train_cfg = DataConfig(sources=[SourceSpec(name="train-src", format="jsonl", path=str(data), split=None)])
    train = build_splits(train_cfg)["train-src"]["train"]
    rm = root / "rm"
    save_tiny_rm(tiny_tok, rm, seed=5, head_scale=20.0)
    (rm / TRAIN_PROMPTS).write_text(json.dumps(train_prompts_record(train["prompt"])))
    return data, rm, {prompt_hash(p) for p in train["prompt"]}


def _eval(tmp, data, rm, test_fraction, valid_fraction, **cal):
    cfg = DataConfig(
        sources=[SourceSpec(name="renamed", format="jsonl", path=str(data), split=None)],
        test_fraction=test_fraction,
        valid_fraction=valid_fraction,
        max_length=32,
    )
    run(calibration_recipe(data=cfg, external_rms={"mine": str(rm)}, **cal), tmp)
    metrics = json.loads((tmp / "calibration" / "metrics.json").read_text())
    return cfg, metrics


def test_overlap_is_reported_and_excluded_so_it_cannot_raise_a_score(trained_rm, tmp_path, capsys):
    data, rm, seen = trained_rm
    # kept (the old behaviour): counted and reported, but scored
    cfg, kept = _eval(tmp_path / "kept", data, rm, 0.8, 0.15, exclude_train_overlap=False, temperature_scaling=False)
    test = build_splits(cfg)["renamed"]["test"]
    is_seen = np.array([prompt_hash(p) in seen for p in test["prompt"]])
    assert 0 < is_seen.sum() < len(test)  # the situation: most rm-eval test prompts were trained on
    o = kept["mine"]["train_overlap"]
    assert o["checked"] and o["test"] == {"renamed": int(is_seen.sum())} and not o["excluded"]
    assert kept["mine"]["renamed"]["n_pairs"] == len(test)
    out = capsys.readouterr().out
    n_valid = len(build_splits(cfg)["renamed"]["validation"])
    assert o["validation"] == {"renamed": n_valid}  # rm-eval's validation cut lies inside the training part
    assert f"mine: {int(is_seen.sum()) + n_valid} of {len(test) + n_valid} evaluation pairs" in out
    assert "KEPT" in out and "[calibration] data renamed: train/validation/test = " in out
    assert f"mine: {int(is_seen.sum()) + n_valid} kept" in train_overlap_line(
        kept
    ) and "inflated" in train_overlap_line(kept)

    # excluded (the default): the score is the one of the unseen pairs alone
    _, excl = _eval(tmp_path / "excl", data, rm, 0.8, 0.15, temperature_scaling=False)
    assert excl["mine"]["train_overlap"]["test"] == o["test"] and excl["mine"]["train_overlap"]["excluded"]
    assert excl["mine"]["renamed"]["n_pairs"] == int((~is_seen).sum())
    scores = np.load(tmp_path / "kept" / "calibration" / "scores.npz")
    rc, rr = scores["mine::renamed::test::chosen"], scores["mine::renamed::test::rejected"]
    ref = M.accuracy(rc[~is_seen], rr[~is_seen])  # independent: the kept run's rewards of the unseen pairs
    assert excl["mine"]["renamed"]["accuracy"] == pytest.approx(ref, abs=1e-12)
    assert excl["mine"]["renamed"]["ece_10"] == pytest.approx(M.pairwise_ece(rc[~is_seen], rr[~is_seen], 10), abs=1e-6)
    cfg_json = json.loads((tmp_path / "excl" / "calibration" / "config.json").read_text())
    assert cfg_json["train_overlap_excluded"]["renamed"]["test"] == int(is_seen.sum())
    # issue 17: the data layer's counts (pairs per split, records read, dropped pairs) are kept by rm-eval runs too
    assert sum(cfg_json["data_stats"]["renamed"]["pairs"].values()) == N_PROMPTS
    assert cfg_json["data_stats"]["renamed"]["loaded"][0]["records"] == N_PROMPTS
    assert "excluded" in capsys.readouterr().out
    assert f"mine: {int(is_seen.sum()) + n_valid} left out" in train_overlap_line(excl)


def test_training_runs_fractions_select_exactly_the_unseen_prompts(trained_rm, tmp_path):
    """The documented way to evaluate on data the RMs never saw: the training run's fractions, whatever the name."""
    data, rm, _ = trained_rm
    _, metrics = _eval(tmp_path / "same", data, rm, 0.1, 0.05)
    o = metrics["mine"]["train_overlap"]
    assert o["checked"] and o["test"] == {"renamed": 0} and o["validation"] == {"renamed": 0}


def test_nothing_left_is_one_clear_error(trained_rm, tmp_path):
    data, rm, _ = trained_rm
    # rm-eval's validation cut (u in [0.8, 0.95)) lies inside the training run's train part: none is left
    with pytest.raises(ValueError, match="every validation pair of source 'renamed'.*temperature_scaling=false"):
        _eval(tmp_path / "x", data, rm, 0.8, 0.15)
    everything = tmp_path / "rm-all"  # an RM trained on every prompt of the file: no test pair is left
    shutil.copytree(rm, everything)
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    (everything / TRAIN_PROMPTS).write_text(json.dumps(train_prompts_record(prompts)))
    with pytest.raises(ValueError, match="every test pair of source 'renamed'.*exclude_train_overlap=false"):
        _eval(tmp_path / "y", data, everything, 0.8, 0.15, temperature_scaling=False)


def test_report_line_separates_synthetic_sources_which_are_only_counted():
    o = {"checked": True, "excluded": True, "kept_sources": ["helpful"]}
    metrics = {
        "more": {"train_overlap": {**o, "test": {"helpful": 7, "mine": 2}, "validation": {"helpful": 3, "mine": 1}}},
        "hub": {"train_overlap": {"checked": False, "excluded": True, "test": {}, "validation": {}}},
    }
    line = train_overlap_line(metrics)
    assert "more: 3 left out, 10 kept on synthetic sources" in line and "hub: not checked" in line
    assert train_overlap_line({"more": {"all_average": {}}}) is None  # metrics.json of an older run: no line
