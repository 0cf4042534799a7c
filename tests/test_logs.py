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
