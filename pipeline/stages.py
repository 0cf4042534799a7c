"""The pipeline's stages, in order: one literal table, read by the recipe loader, the planner and the
orchestrator (no registry, no importlib, no stage names anywhere else in `config`, `plan` or `run`).

Each entry names the stage, the dataclass of its recipe section, and the functions of its package the
orchestrator calls:

- `run(recipe, run_dir, *, force=False) -> list[str]`: do the work; return the artifacts written (paths
  relative to run_dir). `force` (from `--force STAGE`) also redoes sub-results a stage keeps of its own
  (the reward stage's RMs); the other stages rerun whole anyway.
- `inputs(section: dict) -> [(path or hub id, hub repo type)]`: what the stage reads that its own section
  names (a base model, a chat-template file, external RMs), besides the data sources; their CONTENT is part of
  the stage's fingerprint (`pipeline.plan.stage_config_hash`).
- `check(recipe, *, runs, origin)`: checks across sections before any work (also under --dry-run), for a
  selected stage (`runs`: it will actually run, not be skipped as up to date); raises one RecipeError naming
  the key (`origin(key)` says which file or override set it).
- `estimate(recipe, run_dir, world) -> (work, time or None)`: the --dry-run line.
- `space_needed(recipe, run_dir) -> (bytes, how) or None`: what it needs on disk, for the disk-full message.
- `mismatch(recipe, run_dir) -> [{"key", "recipe": value, "recorded": {value as JSON: [names]}}]`: the recipe
  keys whose value differs from what the stage's saved results in run_dir were produced with (the reward
  stage: what each RM's fingerprint.json records). A later stage that would consume those results while this
  stage does not rerun is refused before any work, unless --allow-stale-upstream (`pipeline.plan.check_upstream`);
  `results` names them in that message ("RMs").
- `reads_data`: the stage reads `data.sources` (their paths are checked before any work);
  `follows_upstream`: the stage is regenerated whenever a stage it reads reruns, even when not selected
  (the report).
- `read_by(resolved recipe) -> [stage names]`: an on-demand stage, read only by the stages it names for this
  recipe (the policy stage: align, and reward when it trains `dpo`). The planner adds it whenever one of them
  is selected, and it is upstream of those only (`upstream`); a stage without `read_by` is upstream of every
  stage after it.
- `settings(resolved recipe) -> dict`: for a stage without a recipe section of its own (`config` None), the
  part of the recipe that is its settings, hashed as its section (the policy stage: the align keys that build
  the policy, so the rest of the align section does not rebuild it).

To add a stage: write its package with these functions and add one line to STAGES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.align import stage as align
from pipeline.align.config import AlignConfig
from pipeline.calibration import stage as calibration
from pipeline.calibration.config import CalibrationConfig
from pipeline.data import DataConfig
from pipeline.policy import stage as policy
from pipeline.report import stage as report
from pipeline.report.config import ReportConfig
from pipeline.reward import stage as reward
from pipeline.reward.config import RewardStageConfig


def no_inputs(section: dict) -> list[tuple[str, str]]:
    return []


def no_check(recipe: Any, *, runs: bool, origin: Callable[[str], str]) -> None:
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    config: type | None
    run: Callable[..., list[str]]
    inputs: Callable[[dict], list[tuple[str, str]]] = no_inputs
    check: Callable[..., None] = no_check
    estimate: Callable[..., tuple[str, str | None]] | None = None
    space_needed: Callable[..., tuple[int, str] | None] | None = None
    mismatch: Callable[..., list[dict]] | None = None
    results: str = "results"
    reads_data: bool = True
    follows_upstream: bool = False
    read_by: Callable[[dict], list[str]] | None = None
    settings: Callable[[dict], dict] | None = None


STAGES: tuple[Stage, ...] = (
    Stage(
        "policy",
        None,
        policy.run,
        inputs=policy.inputs,
        check=policy.check,
        estimate=policy.estimate,
        read_by=policy.read_by,
        settings=policy.settings,
    ),
    Stage(
        "reward",
        RewardStageConfig,
        reward.run,
        inputs=reward.inputs,
        check=reward.check,
        estimate=reward.estimate,
        space_needed=reward.space_needed,
        mismatch=reward.mismatch,
        results="RMs",
    ),
    Stage(
        "calibration",
        CalibrationConfig,
        calibration.run,
        inputs=calibration.inputs,
        check=calibration.check,
        estimate=calibration.estimate,
    ),
    Stage("align", AlignConfig, align.run, inputs=align.inputs, check=align.check, estimate=align.estimate),
    Stage("report", ReportConfig, report.run, estimate=report.estimate, reads_data=False, follows_upstream=True),
)

# The recipe section that is not a stage: every data-reading stage reads it.
DATA_SECTION = ("data", DataConfig)


def stage_names() -> list[str]:
    """The stages in pipeline order (read at call time, so a test can replace STAGES)."""
    return [s.name for s in STAGES]


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; valid: {', '.join(stage_names())}")


def section_classes() -> dict[str, type]:
    """Recipe section -> its dataclass: `data` first, then one per stage that has one, in pipeline order."""
    return {DATA_SECTION[0]: DATA_SECTION[1], **{s.name: s.config for s in STAGES if s.config is not None}}


def upstream(name: str, resolved: dict) -> list[str]:
    """The stages `name` follows, in order: every stage before it, but an on-demand one (`read_by`) only when it
    names `name` for this recipe."""
    order = stage_names()
    before = STAGES[: order.index(name)] if name in order else STAGES
    return [s.name for s in before if s.read_by is None or name in s.read_by(resolved)]


def own_settings(name: str, resolved: dict):
    """What of the resolved recipe is stage `name`'s own: its section, or its `settings`."""
    stage = get(name)
    return stage.settings(resolved) if stage.settings is not None else resolved.get(name)


def needed(selected: list[str], resolved: dict) -> list[str]:
    """`selected` plus every on-demand stage a selected stage reads (`read_by`), in pipeline order."""
    wanted = set(selected)
    for s in STAGES:
        if s.read_by is not None and wanted & set(s.read_by(resolved)):
            wanted.add(s.name)
    return [n for n in stage_names() if n in wanted]
