"""Recipes over real data name `data_root`, a folder of the user's own copies: the error without it lists what the
folder must hold, and the README says at its commands that ../shared/data/real is not part of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pipeline.config as C


EXPECTED = (
    "hh-rlhf-helpful/helpful.test.json, hh-rlhf-harmless/harmless-base, oasst1/en_100_tree.jsonl, "
    "webgpt/webgpt.test.json, summarize-from-feedback/comparisons"
)


@pytest.mark.parametrize("recipe", ["rm-eval", "minilm-real"])
def test_a_missing_data_root_names_the_layout_it_needs(recipe, tmp_path):
    with pytest.raises(C.RecipeError) as e:
        C.load_recipe(recipe)
    assert EXPECTED in str(e.value) and "not part of the repository" in str(e.value)
    with pytest.raises(C.RecipeError) as e:
        C.load_recipe(recipe, [f"data_root={tmp_path / 'nowhere'}"])
    assert "is not a directory. Fix: set data_root to a directory holding" in str(e.value) and EXPECTED in str(e.value)


def test_readme_says_shared_data_is_not_in_the_repository_wherever_it_uses_it():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`../shared/data/real` is where this project's own checkouts" in text
    assert "it is not part of the repository" in text
    # every command naming it has the note next to it (in the same table row, or a comment right above)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"python -m pipeline\.\S+ .*data_root=\.\./shared/data/real", line):
            assert "only beside this project's checkouts" in lines[i - 1], line
    assert "data_root=../shared/data/real`" not in text  # the recipe table's command takes your folder
