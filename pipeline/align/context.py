"""What every step of the alignment stage shares: `AlignContext` (recipe, run directory, process state, the
prompts' conversations), the JSON-normal form stored settings are compared in (`plain`), and why a cached
result is made again (`rerun_reason`, printed with the work it redoes).

May import: pipeline leaves only (`pipeline.io`, `pipeline.logs`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import read_json
from pipeline.logs import say


class AlignContext:
    """Everything the sub-steps share (kept small and explicit)."""

    def __init__(self, recipe, run_dir: Path):
        import torch
        from accelerate import PartialState

        self.recipe, self.cfg, self.seed = recipe, recipe.align, int(recipe.seed)
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "align"
        self.state = PartialState()
        self.main = self.state.is_main_process
        self.device = self.state.device if torch.cuda.is_available() else torch.device("cpu")
        self.conversations: dict = {}  # prompt text -> '{"prompt": [messages]}' for conversational prompts

    def barrier(self):
        self.state.wait_for_everyone()

    def log(self, msg: str):
        if self.main:
            say("align", msg)


def plain(obj):
    """JSON-normal form (tuples become lists), so stored settings compare equal to fresh ones."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def rerun_reason(settings_file: Path, settings, result: Path | None = None) -> str | None:
    """Why the result whose settings were stored in `settings_file` (and, when given, whose main file is
    `result`) is made again, or None when it exists with exactly `settings` (reuse it). Stored stamps are
    `pipeline.io.sha256_json(...)[:16]`: a stamp from an older version of the pipeline (another hash) reads as
    changed settings, so that work is redone, once, saying so."""
    if not settings_file.exists() or (result is not None and not result.exists()):
        return "not made yet"
    if read_json(settings_file) != settings:
        return "its settings changed since it was made (or an older version of the pipeline made it)"
    return None


def why(reason: str) -> str:
    """The reason appended to a progress line ('' for work done the first time)."""
    return "" if reason == "not made yet" else f": {reason}"
