"""The calibration stage end to end on CPU with tiny RMs saved in a temporary DIR/reward/.

The distributed test launches THIS file as the worker script:
    PYTHONPATH=. torchrun --nproc_per_node 2 tests/test_calibration_stage.py RUN_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.calibration import metrics as M
from pipeline.calibration.config import CalibrationConfig
from pipeline.calibration.stage import run
from pipeline.calibration.temperature import fit_temperature
from tests.helpers import (
    CAL_MAX_LEN,
    CAL_N_TEST,
    CAL_N_VALID,
    CAL_SOURCES,
    calibration_data_config,
    calibration_recipe,
    save_tiny_rm,
    torchrun_worker,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("calib_run")
    reward = root / "reward"
    index = {}
    for i, (name, method, sources) in enumerate(
        [
            ("more", "more", CAL_SOURCES),
            ("single-helpful", "single", ["helpful"]),
            ("single-harmless", "single", ["harmless"]),
        ]
    ):
        save_tiny_rm(tiny_tok, reward / name, seed=i, head_scale=20.0)
        index[name] = {"path": str(reward / name), "method": method, "sources": sources}
    log = [
        {"step": s, "loss": 0.7, **{f"more/lambda/{src}": w for src, w in zip(CAL_SOURCES, lam)}}
        for s, lam in ((1, (0.5, 0.3, 0.2)), (2, (0.4, 0.4, 0.2)), (3, (0.3, 0.3, 0.4)))
    ]
    (reward / "more" / "train_log.json").write_text(json.dumps(log + [{"step": 3, "train_runtime": 1.0}]))
    (reward / "index.json").write_text(json.dumps(index))
    artifacts = run(calibration_recipe(), root)
    return root, artifacts


def _independent_rewards(path: Path, ds, max_length: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair, unbatched, unpadded fp32 forward passes with manual left truncation + EOS (first n pairs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def reward(text):
        ids = tok(text, add_special_tokens=False)["input_ids"][-(max_length - 1) :] + [tok.eos_token_id]
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    ds = ds.select(range(n))
    rc = np.array([reward(p + c) for p, c in zip(ds["prompt"], ds["chosen"])])
    rr = np.array([reward(p + r) for p, r in zip(ds["prompt"], ds["rejected"])])
    return rc, rr


def test_stage_writes_every_artifact(run_dir):
    root, artifacts = run_dir
    cal = root / "calibration"
    expected = [
        "metrics.json",
        "table.md",
        "temperatures.json",
        "scores.npz",
        "diversity.json",
        "reliability.png",
        "reliability_temperature_scaled.png",
        "reward_differences.png",
        "more_weights_more.png",
        "diversity_accuracy.png",
        "diversity_ece.png",
        "config.json",
    ]
    for name in expected:
        assert (cal / name).is_file() and (cal / name).stat().st_size > 0, name
        assert f"calibration/{name}" in artifacts
    for rm in ("more", "single-helpful", "single-harmless"):
        t = json.loads((root / "reward" / rm / "temperature.json").read_text())
        assert t["temperature"] > 0
        assert f"reward/{rm}/temperature.json" in artifacts
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no leftover temp dirs
    # the single-source RMs have no MORE log: no trajectory plot for them
    assert not (cal / "more_weights_single-helpful.png").exists()


def test_scores_match_independent_unbatched_forward(run_dir, tiny_tok):
    from pipeline.data import build_splits

    root, _ = run_dir
    scores = np.load(root / "calibration" / "scores.npz")
    splits = build_splits(calibration_data_config())
    n = 6
    for rm, source in (("more", "helpful"), ("single-harmless", "webgpt")):
        rc, rr = _independent_rewards(root / "reward" / rm, splits[source]["test"], CAL_MAX_LEN, n)
        np.testing.assert_allclose(scores[f"{rm}::{source}::test::chosen"][:n], rc, atol=2e-5)
        np.testing.assert_allclose(scores[f"{rm}::{source}::test::rejected"][:n], rr, atol=2e-5)
    # some transcripts are longer than CAL_MAX_LEN, so left truncation was exercised
    from pipeline.data.tokenize import encode_left

    ds = splits["helpful"]["test"]
    _, n_cut = encode_left(tiny_tok, [p + c for p, c in zip(ds["prompt"], ds["chosen"])], CAL_MAX_LEN)
    assert n_cut > 0


def test_metrics_are_consistent_with_independent_recomputation(run_dir):
    from pipeline.data import build_splits

    root, _ = run_dir
    metrics = json.loads((root / "calibration" / "metrics.json").read_text())
    temps = json.loads((root / "calibration" / "temperatures.json").read_text())
    scores = np.load(root / "calibration" / "scores.npz")
    splits = build_splits(calibration_data_config())
    assert set(metrics) == {"more", "single-helpful", "single-harmless", "averaging"}
    assert set(temps) == set(metrics)
    for rm, entry in metrics.items():
        assert set(entry) == set(CAL_SOURCES) | {"hh_average", "all_average", "train_overlap"}
        assert entry["train_overlap"]["checked"] is False  # these RMs have no train_prompts.json
        val_c = np.concatenate([scores[f"{rm}::{s}::validation::chosen"] for s in CAL_SOURCES])
        val_r = np.concatenate([scores[f"{rm}::{s}::validation::rejected"] for s in CAL_SOURCES])
        assert len(val_c) == CAL_N_VALID * len(CAL_SOURCES)
        t = fit_temperature(val_c, val_r).temperature
        assert temps[rm] == pytest.approx(t, rel=1e-9)
        for s in CAL_SOURCES:
            rc, rr = scores[f"{rm}::{s}::test::chosen"], scores[f"{rm}::{s}::test::rejected"]
            m = entry[s]
            assert m["n_pairs"] == CAL_N_TEST
            assert m["accuracy"] == pytest.approx(float(np.mean(np.where(rc > rr, 1, np.where(rc < rr, 0, 0.5)))))
            for nb in (5, 10, 20):
                assert m[f"ece_{nb}"] == pytest.approx(M.pairwise_ece(rc, rr, nb), abs=1e-12)
            assert m["ace_10"] == pytest.approx(M.pairwise_calibration(rc, rr, 10)["ace"], abs=1e-12)
            assert m["nll"] == pytest.approx(M.nll(rc, rr))
            assert m["intervals"]["accuracy"][0] <= m["accuracy"] <= m["intervals"]["accuracy"][1]
            ts = m["temperature_scaled"]
            assert ts["temperature"] == pytest.approx(t, rel=1e-9)
            assert ts["ece_10"] == pytest.approx(M.pairwise_ece(rc / t, rr / t, 10), abs=1e-9)
            assert ts["accuracy"] == m["accuracy"]
            # synthetic sources carry the truth
            true_prob = np.asarray(splits[s]["test"]["true_prob"])
            assert m["truth"]["prob_mae"] == pytest.approx(
                float(np.mean(np.abs(1 / (1 + np.exp(-(rc - rr))) - true_prob)))
            )
            assert "truth_gold" in m
        hh = entry["hh_average"]
        assert hh["sources"] == ["helpful", "harmless"]
        assert hh["accuracy"] == pytest.approx((entry["helpful"]["accuracy"] + entry["harmless"]["accuracy"]) / 2)
        assert hh["temperature_scaled"]["ece_10"] == pytest.approx(
            (entry["helpful"]["temperature_scaled"]["ece_10"] + entry["harmless"]["temperature_scaled"]["ece_10"]) / 2
        )
        assert entry["all_average"]["ece_10"] == pytest.approx(np.mean([entry[s]["ece_10"] for s in CAL_SOURCES]))
        assert entry["all_average"]["n_pairs"] == CAL_N_TEST * len(CAL_SOURCES)
    # the Averaging RM is the mean reward of the single-source RMs, scored like any RM
    for s in CAL_SOURCES:
        for side in ("chosen", "rejected"):
            mean = (scores[f"single-helpful::{s}::test::{side}"] + scores[f"single-harmless::{s}::test::{side}"]) / 2
            np.testing.assert_allclose(scores[f"averaging::{s}::test::{side}"], mean, rtol=0, atol=1e-12)
    # each RM dir got its temperature
    for rm in ("more", "single-helpful"):
        assert json.loads((root / "reward" / rm / "temperature.json").read_text())["temperature"] == temps[rm]


def test_diversity_matrix_and_table(run_dir):
    root, _ = run_dir
    metrics = json.loads((root / "calibration" / "metrics.json").read_text())
    div = json.loads((root / "calibration" / "diversity.json").read_text())
    assert div["trained_on"] == ["helpful", "harmless"] and div["tested_on"] == CAL_SOURCES
    for i, rm in enumerate(div["rms"]):
        for j, s in enumerate(CAL_SOURCES):
            assert div["accuracy"][i][j] == metrics[rm][s]["accuracy"]
            assert div["ece_10"][i][j] == pytest.approx(metrics[rm][s]["ece_10"])
    table = (root / "calibration" / "table.md").read_text()
    assert "Table 2 layout" in table and "Table 1 layout" in table and "temperature scaling" in table
    for rm in metrics:
        row = next(line for line in table.splitlines() if line.startswith(f"| {rm} |"))
        avg = metrics[rm]["all_average"]
        assert f"{100 * avg['accuracy']:.2f}" in row and f"{avg['ece_10']:.4f}" in row


def test_bad_inputs_raise_one_clear_error(tmp_path, tiny_tok):
    # unknown bin strategy
    with pytest.raises(ValueError, match="unknown bin strategy 'equal-ish'"):
        CalibrationConfig(strategy="equal-ish")
    # no index
    with pytest.raises(FileNotFoundError, match="run the reward stage first"):
        run(calibration_recipe(), tmp_path)
    # an RM directory that does not load
    reward = tmp_path / "reward"
    (reward / "broken").mkdir(parents=True)
    (reward / "broken" / "config.json").write_text("{not json")
    tiny_tok.save_pretrained(reward / "broken")  # its tokenizer is fine: the broken config.json is what is tested
    (reward / "index.json").write_text(json.dumps({"broken": {"path": str(reward / "broken"), "method": "more"}}))
    with pytest.raises(ValueError, match="reward model 'broken' at .* does not load"):
        run(calibration_recipe(), tmp_path)
    (reward / "index.json").write_text(json.dumps({"gone": {"path": str(reward / "gone"), "method": "more"}}))
    with pytest.raises(FileNotFoundError, match="reward model 'gone'.*does not exist"):
        run(calibration_recipe(), tmp_path)
    # a source with no test split (a one-split source cut with test_fraction = 0)
    from pipeline.data import DataConfig, SourceSpec

    rows = [{"prompt": f"\n\nHuman: q{i}?\n\nAssistant:", "chosen": " yes", "rejected": " no"} for i in range(20)]
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_rm(tiny_tok, reward / "ok", seed=0, head_scale=1.0)
    (reward / "index.json").write_text(json.dumps({"ok": {"path": str(reward / "ok"), "method": "more"}}))
    data = DataConfig(sources=[SourceSpec(name="mine", format="jsonl", path=str(data_file))], test_fraction=0.0)
    with pytest.raises(ValueError, match="source 'mine' has no test split"):
        run(calibration_recipe(data=data), tmp_path)
    # unknown RM requested
    with pytest.raises(ValueError, match=r"calibration.rms: \['nope'\] not in"):
        run(calibration_recipe(rms=["nope"]), tmp_path)


def test_cli_runs_the_stage_alone(tmp_path, tiny_tok, capsys):
    """`python -m pipeline.calibration --recipe PATH --output-dir DIR key=value` through the real recipe loader."""
    from pipeline.run import main_for_stage

    def main(argv):
        return main_for_stage("calibration", argv)

    # no reward stage output yet: one clear message, exit status 2
    assert main(["--recipe", "tiny-cpu", "--output-dir", str(tmp_path)]) == 2
    assert "run the reward stage first" in capsys.readouterr().err
    save_tiny_rm(tiny_tok, tmp_path / "reward" / "multitask", seed=5, head_scale=10.0)
    (tmp_path / "reward" / "index.json").write_text(
        json.dumps({"multitask": {"path": "multitask", "method": "multitask", "sources": ["helpful"]}})
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: cli\nseed: 1\n"
        "data:\n  sources: [{name: helpful, format: synthetic}]\n  n_train_per_source: 4\n"
        "  n_valid_per_source: 10\n  n_test_per_source: 12\n  max_length: 32\n"
        "calibration:\n  dtype: fp32\n  progress: false\n  plots: false\n"
    )
    assert (
        main(
            [
                "--recipe",
                str(recipe),
                "--output-dir",
                str(tmp_path),
                "calibration.bootstrap_samples=0",
                "calibration.n_bins=[4,8]",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "calibration" / "metrics.json").read_text())
    assert set(metrics["multitask"]["helpful"]) >= {"ece_4", "ece_8", "ece_10", "accuracy"}
    assert "intervals" not in metrics["multitask"]["helpful"]
    assert metrics["multitask"]["hh_average"]["sources"] == ["helpful"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_shard_scoring_and_one_writes(run_dir, tmp_path):
    """Under torchrun (gloo, 2 CPU ranks) each rank scores half the pairs; rank 0 alone writes."""
    root, _ = run_dir
    shutil.copytree(root / "reward", tmp_path / "reward")
    for rm in ("more", "single-helpful", "single-harmless"):
        (tmp_path / "reward" / rm / "temperature.json").unlink()
    index = json.loads((tmp_path / "reward" / "index.json").read_text())
    for name in index:  # point the copy at its own RM dirs
        index[name]["path"] = str(tmp_path / "reward" / name)
    (tmp_path / "reward" / "index.json").write_text(json.dumps(index))
    ranks = torchrun_worker(Path(__file__).resolve(), tmp_path, timeout=300)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["artifacts"] and ranks[1]["artifacts"] == []  # only the main process writes
    single = np.load(root / "calibration" / "scores.npz")
    multi = np.load(tmp_path / "calibration" / "scores.npz")
    assert sorted(single.files) == sorted(multi.files)
    for key in single.files:
        np.testing.assert_allclose(multi[key], single[key], atol=1e-4)
    assert json.loads((tmp_path / "reward" / "more" / "temperature.json").read_text())["temperature"] > 0


def test_corrupt_rm_weights_name_the_rm(tmp_path, tiny_tok):
    """Random bytes in an RM's weights (right shapes, a loadable file) give NaN/inf rewards: the error must
    name the RM, not only count the pairs."""
    from safetensors.torch import load_file, save_file

    reward = tmp_path / "reward"
    save_tiny_rm(tiny_tok, reward / "bad", seed=1, head_scale=1.0)
    weights = load_file(reward / "bad" / "model.safetensors")
    head = weights["score.weight"]  # random bytes in the whole model also work, but denormals make CPU math slow
    noise = torch.randint(
        0, 256, (head.numel() * head.element_size(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    weights["score.weight"] = noise.view(head.dtype).reshape(head.shape).clone()
    weights["score.weight"][0, 0] = float("nan")  # certain, whatever the random bytes
    save_file(weights, reward / "bad" / "model.safetensors", metadata={"format": "pt"})
    (reward / "index.json").write_text(json.dumps({"bad": {"path": str(reward / "bad"), "method": "multitask"}}))
    with pytest.raises(
        ValueError, match=r"reward model 'bad' at .*bad gives a non-finite reward .* for \d+ of \d+ pairs"
    ):
        run(calibration_recipe(max_pairs_per_split=8), tmp_path)


if __name__ == "__main__":  # the torchrun worker of the distributed test
    from accelerate import PartialState

    out = Path(sys.argv[1])
    artifacts = run(calibration_recipe(), out)
    state = PartialState()
    (out / f"rank{state.process_index}.json").write_text(
        json.dumps({"world": state.num_processes, "artifacts": artifacts})
    )
    from pipeline.dist import shutdown_distributed

    shutdown_distributed()  # deterministic teardown: no rank may abort at interpreter exit
