"""MORE on exactly two sources under l2 normalisation IS the Uniform baseline (the min-norm point between two unit
vectors is their midpoint), and every place a user decides or reads says so: the trainer's log, the recipe check
(--dry-run), report.md and the README's MORE section."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.config as C
import pipeline.report.stage as report
import pipeline.run as R
from pipeline.reward.more import min_norm_weights, normalize_gradients
from pipeline.reward.trainer import MORERewardTrainer
from tests import reward_helpers as H


TWO = ["helpful", "harmless"]
NOTE = "MORE on two sources with reward.train.normalize=l2 is exactly the Uniform baseline"


def test_the_min_norm_point_of_two_unit_vectors_is_their_midpoint():
    gen = torch.Generator().manual_seed(0)
    for d in (2, 3, 17, 256):
        for _ in range(20):
            g = torch.randn(2, d, generator=gen, dtype=torch.float64) * torch.rand(
                2, 1, generator=gen, dtype=torch.float64
            )
            lam = min_norm_weights(normalize_gradients(g, "l2")).numpy()
            np.testing.assert_allclose(lam, [0.5, 0.5], atol=1e-9)
    # without the normalisation the weights move (the gradients' sizes differ)
    g = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert abs(float(min_norm_weights(normalize_gradients(g, "none"))[0]) - 0.5) > 0.3


def _two_source_pairs(n_blocks: int = 10):
    ds = H.balanced_pairs(n_blocks)
    return ds.filter(lambda r: r["source_id"] < 2)  # blocks of 2 helpful + 2 harmless, in order


def _train(tok, tmp_path, method: str, caplog, **kw):
    cfg = H.config(tmp_path / method, method, source_names=TWO, per_device_train_batch_size=4, max_steps=8, **kw)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer = MORERewardTrainer(
            H.model("gpt_neox", tok), cfg, train_dataset=_two_source_pairs(), processing_class=tok
        )
    warned = [r.getMessage() for r in caplog.records if "exactly the Uniform baseline" in r.getMessage()]
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h], warned


def test_two_source_more_under_l2_trains_exactly_as_uniform(tmp_path, caplog, one_thread):
    """lambda is 0.5 (up to float32 rounding) at every step, and every step's loss equals Uniform's."""
    tok = H.tokenizer()
    more, warned_more = _train(tok, tmp_path, "more", caplog)
    uniform, warned_uniform = _train(tok, tmp_path, "uniform", caplog)
    assert len(more) == len(uniform) == 8
    for h in more:
        for s in TWO:
            assert abs(h[f"more/lambda/{s}"] - 0.5) <= 1e-6, h
    # the two trajectories part only by lambda's float32 rounding (6e-8), which Adam carries along
    np.testing.assert_allclose([h["loss"] for h in more], [h["loss"] for h in uniform], rtol=1e-4)
    # the trainer says so when it starts (library users see it too), and only for this case
    assert len(warned_more) == 1 and "set normalize to none or loss" in warned_more[0] and not warned_uniform
    _, warned_none = _train(tok, tmp_path / "none", "more", caplog, normalize="none")
    assert not warned_none


SOURCES_OVERRIDE = "data.sources=[{name: helpful, format: synthetic}, {name: harmless, format: synthetic}]"


def test_two_source_more_loss_is_uniforms_on_the_same_model_and_batch(tmp_path):
    """The loss itself, same weights and same batch: MORE's (with its min-norm weights) is Uniform's."""
    tok = H.tokenizer()
    model, ds = H.model("gpt_neox", tok), _two_source_pairs()
    losses = {}
    for method in ("more", "uniform"):
        cfg = H.config(tmp_path / method, method, source_names=TWO, per_device_train_batch_size=4)
        trainer = MORERewardTrainer(model, cfg, train_dataset=ds, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        losses[method] = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(losses["more"], losses["uniform"], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("normalize, warned", [(None, True), ("none", False), ("loss", False)])
def test_dry_run_warns_about_two_source_more_under_l2(tmp_path, capsys, normalize, warned):
    extra = [f"reward.train.normalize={normalize}"] if normalize else []
    argv = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run", SOURCES_OVERRIDE, *extra]
    assert R.main(argv) == 0
    out = capsys.readouterr().out
    assert (f"[reward] warning: {NOTE}" in out) is warned
    if warned:
        assert "set reward.train.normalize to none or loss" in out


def test_dry_run_of_five_sources_does_not_warn(tmp_path, capsys):
    assert R.main(["--recipe", "tiny-cpu", "--output-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "Uniform baseline" not in capsys.readouterr().out


def _run_with_more(tmp_path: Path, normalize: str | None, lambdas=(0.5, 0.5)) -> Path:
    d = tmp_path / "run"
    rm = d / "reward" / "more"
    rm.mkdir(parents=True)
    (d / "reward" / "index.json").write_text(
        json.dumps({"more": {"path": "reward/more", "method": "more", "sources": TWO}})
    )
    if normalize is not None:
        (rm / "fingerprint.json").write_text(json.dumps({"inputs": {"train_args": {"normalize": normalize}}}))
    log = [{"step": 10, "more/lambda/helpful": lambdas[0], "more/lambda/harmless": lambdas[1]}]
    (rm / "train_log.json").write_text(json.dumps(log))
    return d


@pytest.mark.parametrize(
    "normalize, lambdas, said",
    [
        ("l2", (0.5, 0.5), True),
        ("none", (0.3, 0.7), False),
        (None, (0.5000000119, 0.4999999881), True),
        (None, (0.4, 0.6), False),
    ],
)
def test_report_says_a_two_source_l2_more_rm_is_uniform(tmp_path, normalize, lambdas, said):
    d = _run_with_more(tmp_path, normalize, lambdas)
    md = report.render_report(C.load_recipe("tiny-cpu"), d)[0]
    assert ("**more is the Uniform baseline here.** " + NOTE in md) is said
    if said:
        reward_part = md.split("## Reward models")[1].split("## Calibration")[0]
        assert "both source weights are 0.5 at every step" in reward_part


def test_readme_more_section_says_two_sources_under_l2_is_uniform():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("- **Reward training**")[1].split("- **Calibration**")[0]
    assert "With exactly two sources, `normalize: l2` makes MORE the Uniform baseline" in " ".join(section.split())
