"""Errors a user can cause and fix (a leaf: imports nothing of the pipeline).

`RecipeError` is one line naming the recipe key, file or model and the fix; `pipeline.run` prints it
without a traceback and exits with code 2. Stages raise it too (they never import the recipe loader)."""

from __future__ import annotations


class RecipeError(ValueError):
    """A user-fixable problem in a recipe file, a command-line override or an input it names."""
