"""Log noise: no warning caused by the project's own configuration."""

from __future__ import annotations

import warnings

import pytest

from pipeline.config import load_recipe, preset_names


def test_reward_config_default_does_not_warn_and_old_name_still_works(tmp_path):
    from pipeline.reward.trainer import MORERewardConfig

    kw = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, method="multitask")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert MORERewardConfig(**kw).activation_checkpointing is True  # TRL's default, without the warning
        assert MORERewardConfig(**kw, activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the user's own deprecated key: theirs
        assert MORERewardConfig(**kw, gradient_checkpointing=False).activation_checkpointing is False


@pytest.mark.parametrize("name", preset_names())
def test_shipped_recipes_build_training_args_without_future_warnings(name, tmp_path):
    from pipeline.reward.trainer import MORERewardConfig

    recipe = load_recipe(name, ["data_root=" + str(tmp_path)] if name in ("minilm-real", "rm-eval") else [])
    args = recipe.reward.training_args(dict(output_dir=str(tmp_path), use_cpu=True, method="multitask"))
    args["bf16"] = False
    args.pop("deepspeed", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        MORERewardConfig(**args)


def test_progress_lines_in_a_log_file_every_ten_percent():
    import io

    from pipeline.logs import LineProgress, progress_bar

    out = io.StringIO()  # not a tty: percentage lines
    bar = progress_bar(range(500), desc="warm-start policy", stream=out, min_seconds=0)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.500")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("[warm-start policy] 10% (50/500), ")
    assert "ETA" in lines[0] and "(loss=0.500)" in lines[0]
    assert lines[-1].startswith("[warm-start policy] 100% (500/500)") and "ETA" not in lines[-1]
    out = io.StringIO()
    bar = progress_bar(
        total=1000, initial=420, desc="ppo", stream=out, min_seconds=0
    )  # resumed at 420: 500, 600, ... 1000
    bar.update(79)
    assert out.getvalue() == ""
    for _ in range(600):  # past the total: 100% once
        bar.update(1)
    assert [ln.split("%")[0] for ln in out.getvalue().splitlines()] == [f"[ppo] {p}" for p in range(50, 101, 10)]
    out = io.StringIO()  # a loop done within seconds: only its last line
    bar = progress_bar(total=50, desc="fast", stream=out)
    for _ in range(50):
        bar.update(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("[fast] 100% (50/50)")
    out = io.StringIO()
    bar = progress_bar(total=3, desc="x", stream=out, disable=True)
    bar.update(3)
    assert out.getvalue() == ""


def test_library_noise_is_filtered_once():
    import logging

    from pipeline.logs import quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()
    ds, bnb = logging.getLogger("DeepSpeed"), logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(ds.filters) == 1
    seen = []

    class Keep(logging.Handler):  # on the loggers themselves: DeepSpeed's does not propagate once imported
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    for logger in (ds, bnb):
        logger.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
        ds.warning("something else")
    finally:
        for logger in (ds, bnb):
            logger.removeHandler(handler)
    assert seen == ["something else"]


def test_a_trainer_in_a_log_file_prints_sparse_progress_lines_not_metric_dicts(tmp_path, capsys):
    from pipeline.logs import attach_progress
    from pipeline.reward.trainer import MORERewardTrainer
    from tests import reward_helpers as H

    tok = H.tokenizer()
    args = H.config(tmp_path, max_steps=10, logging_steps=1)
    trainer = MORERewardTrainer(
        H.model(tok=tok), args, train_dataset=H.balanced_pairs(n_blocks=12), processing_class=tok
    )
    attach_progress(trainer, "reward more, RM 1 of 1")  # pytest's captured stderr is not a tty
    trainer.train()
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    assert "{'loss'" not in out.out + out.err  # no per-step metric dicts
    progress = [ln for ln in lines if ln.startswith("[reward more, RM 1 of 1]")]
    assert progress and progress[-1].startswith("[reward more, RM 1 of 1] 100% (10/10)") and "loss=" in progress[-1]
