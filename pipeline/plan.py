"""What a run does, decided before any work: which stages run and why (a pure decision from the recipe, the
manifest and the file system; `pipeline.run` executes it).

A stage is skipped when its manifest entry is "done", its config hash (`stage_config_hash`: its own section,
`data`, `seed`, every upstream stage's hash and the CONTENT of the local files the recipe names) is unchanged,
all its artifacts exist with the recorded sizes and contents, and the upstream stages it consumed have not
been rerun since. Otherwise it runs, and so does every selected stage after it. A stage outside --stages
whose upstream reruns is marked STALE, except a stage that follows its upstream (the report), which is
regenerated. Every reason names what changed.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import stages as stage_table
from pipeline.config import recipe_to_dict
from pipeline.errors import RecipeError, redact_credentials
from pipeline.io import changed_files, content_records, dict_changes, hub_revision, is_hub_id, sha256_json
from pipeline.manifest import missing_artifacts, upstream_tokens


FORCED = "forced (--force)"


def select_stages(stages: str | list[str] | None, recipe_stages: list[str] | None = None) -> list[str]:
    """Validate a --stages value (comma list) and return it in pipeline order."""
    valid = stage_table.stage_names()
    if stages is None:
        chosen = list(recipe_stages) if recipe_stages is not None else valid
    else:
        chosen = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
        chosen = [s for s in chosen if s]
    bad = [s for s in chosen if s not in valid]
    if bad:
        raise RecipeError(f"unknown stage(s) {', '.join(bad)}; valid stages, in order: {', '.join(valid)}")
    if not chosen:
        raise RecipeError(f"no stage selected; valid stages, in order: {', '.join(valid)}")
    return [s for s in valid if s in chosen]


def plan(recipe, run_dir: Path, manifest: dict, selected: list[str], force: list[str]) -> list[dict]:
    """Decide, for each stage in order, whether to run it and why. Pure (reads only the file system)."""
    entries = manifest.get("stages", {})
    resolved = recipe_to_dict(recipe)
    rerun: set[str] = set()
    steps = []
    for stage in stage_table.STAGES:
        name = stage.name
        h = stage_config_hash(recipe, name)
        entry = entries.get(name)
        follows = stage_table.upstream(name, resolved)
        upstream_now = upstream_tokens(entries, follows)
        ups = [u for u in follows if u in rerun]
        if name not in selected:
            step = _unselected_step(stage, h, entry, upstream_now, ups)
        else:
            reason = _run_reason(run_dir, resolved, name, h, entry, upstream_now, ups, name in force)
            if reason is None:
                step = {"stage": name, "action": "skip", "hash": h, "reason": f"up to date (hash {h[:10]})"}
            else:
                step = {"stage": name, "action": "run", "hash": h, "reason": reason}
        if step["action"] == "run":
            rerun.add(name)
        steps.append(step)
    return steps


def _run_reason(run_dir, resolved, name, h, entry, upstream_now, upstream_rerun, forced) -> str | None:
    """Why a selected stage must run (None: it is up to date)."""
    if forced:
        return FORCED
    status = None if entry is None else entry.get("status")
    if status in (None, "skipped"):
        return "never run in this directory"
    if status == "running":
        return "interrupted while running: resuming from its checkpoints"
    if status == "failed":
        return f"previous attempt failed ({entry.get('error', 'unknown error')}): retrying"
    if status != "done":
        return f"status {status!r}"
    if entry.get("config_hash") != h:
        return config_change_reason(entry, stage_inputs(resolved, name), h)
    if missing := missing_artifacts(run_dir, entry.get("artifacts", [])):
        return f"artifacts missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    if changed := changed_files(run_dir, entry.get("artifact_files", {})):
        return f"artifacts changed since it finished: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
    if upstream_rerun:
        return f"upstream stage {upstream_rerun[-1]} reruns"
    if entry.get("upstream", {}) != upstream_now:
        changed = sorted(set(entry.get("upstream", {}).items()) ^ set(upstream_now.items()))
        return f"upstream stage {changed[0][0]} was rerun since this stage finished"
    return None


def _unselected_step(stage, h: str, entry: dict | None, upstream_now: dict, upstream_rerun: list[str]) -> dict:
    """A stage outside --stages: one that follows its upstream (the report) is regenerated when a stage it
    reads from reruns (or reran since it was written), so report.md never shows old numbers; any other
    finished stage is marked stale."""
    step = {"stage": stage.name, "action": "exclude", "hash": h, "reason": "not selected"}
    if entry is None or entry.get("status") != "done":
        return step
    if upstream_rerun:
        why = f"upstream stage {upstream_rerun[-1]} reruns"
    elif entry.get("upstream", {}) != upstream_now:
        changed = sorted(set(entry.get("upstream", {}).items()) ^ set(upstream_now.items()))
        why = f"upstream stage {changed[0][0]} was rerun since this stage finished"
    else:
        return step
    if stage.follows_upstream:
        return {**step, "action": "run", "reason": f"regenerated: {why}"}
    return {**step, "stale": why, "reason": f"not selected; its results are STALE ({why}): add it to --stages"}


def stage_inputs(resolved: dict, stage: str) -> dict:
    """The parts of the resolved recipe a stage's config hash covers (seed, data, its own and every upstream
    section; for a stage without a section, the policy's, the align keys it is built from), stored in its manifest entry so a later plan can say which KEYS changed; a credential inside a URL
    is masked, in the manifest and in the reason a plan logs (`redact_credentials`)."""
    order = stage_table.stage_names()
    upto = [*stage_table.upstream(stage, resolved), stage] if stage in order else [stage]
    own = {s for s in upto if s not in order or stage_table.get(s).settings is None}  # stages with a section
    inputs = {"seed": resolved.get("seed"), "data": resolved.get("data")}
    for s in upto:  # a stage without a section (the policy's): its settings, keys of another section
        if s not in own:
            inputs.update(stage_table.own_settings(s, resolved))
    inputs.update({s: resolved.get(s) for s in upto if s in own})
    return redact_credentials(inputs)


def config_change_reason(entry: dict, inputs_now: dict, h: str) -> str:
    """'config changed: reward.train.learning_rate: 0.0001 -> 0.0005' from the inputs recorded in the manifest;
    the hashes only when the keys are equal (a local data file changed) or an older manifest recorded none."""
    old = entry.get("inputs")
    if isinstance(old, dict):
        changes = dict_changes(old, inputs_now)
        if changes:
            return "config changed: " + changes
        return "local input files changed (size or modification time of a data file or external RM)"
    return f"config changed (hash {str(entry.get('config_hash'))[:10]} -> {h[:10]})"


def check_data_paths(recipe) -> None:
    """Every non-synthetic data source names an existing local path or a hub id (owner/name); checked before
    any work, --dry-run included, so a typo in a path is one line instead of a failure minutes later."""
    for i, spec in enumerate(recipe.data.sources):
        if spec.format is None or spec.format == "synthetic":
            continue
        path = spec.path or spec.name
        if not Path(path).expanduser().exists() and not is_hub_id(path):
            raise RecipeError(
                f"data.sources[{i}] ({spec.name!r}, format {spec.format}): path {path!r} does not exist (resolved: "
                f"{Path(path).expanduser().resolve()}) and is not a hub id owner/name. Fix: correct the path "
                "(relative paths are taken from the working directory; data_root=DIR sets ${data_root})"
            )


# ---------------------------------------------------------------------------------------------------
# Fingerprints of the stages' configurations


def stage_config_hash(recipe, stage: str) -> str:
    """sha256 of what `stage` depends on: its own section, `data`, `seed`, every upstream stage's hash, and
    the CONTENT of the local files the recipe names by path and the hub revision of the hub ids it names
    (`local_input_stats`).

    Upstream = the stages before it in pipeline order (an on-demand stage, the policy's, only for the stages
    that read it: `pipeline.stages.upstream`), so a change anywhere upstream changes every downstream hash. `name`, `description`, `output_dir` and `stages` are not part of any hash (renaming or moving a run
    does not invalidate it).
    """
    order = stage_table.stage_names()
    if stage not in order:
        raise ValueError(f"unknown stage {stage!r}; valid: {order}")
    d = recipe_to_dict(recipe)
    upstream = {u: stage_config_hash(recipe, u) for u in stage_table.upstream(stage, d)}
    payload = {
        "stage": stage,
        "section": stage_table.own_settings(stage, d),
        "data": d.get("data"),
        "seed": d.get("seed"),
        "upstream": upstream,
    }
    files = local_input_stats(d, stage)
    if files:  # only when there are local inputs, so hashes of runs without any stay as they were
        payload["local_inputs"] = files
    return sha256_json(payload)


def input_paths(d: dict, stage: str) -> list[tuple[str, str]]:
    """(path or hub id, hub repo type) of every input a stage reads that the recipe names: the data sources
    (every stage) and what its own section names (the stage's `inputs`)."""
    out = [
        (s.get("path"), "dataset")
        for s in (d.get("data") or {}).get("sources") or []
        if isinstance(s, dict) and s.get("format") != "synthetic"
    ]
    return out + stage_table.get(stage).inputs(stage_table.own_settings(stage, d) or {})


def local_input_stats(d: dict, stage: str) -> dict:
    """What a stage's inputs named by path hold: [relative path, size, sha256] of every file under each local
    path, and for a hub id the commit the local hub cache resolves it to. Editing or replacing such a file
    (also in place, with its size and mtime kept) changes the stage's hash, so a result computed from the old
    file is never reused. Content hashes are cached (`pipeline.io.content_sha256`), so a large model is read
    once per change. Missing paths and hub ids not in the local cache contribute nothing; calibration's own
    `temperature.json` inside an RM directory is not an input."""
    out = {}
    for p, repo_type in input_paths(d, stage):
        if not isinstance(p, str) or not p:
            continue
        if os.path.exists(os.path.expanduser(p)):
            out[p] = content_records(os.path.expanduser(p), skip=frozenset({"temperature.json"}))
        elif repo_type and (rev := hub_revision(p, repo_type)):
            out[p] = {"hub_revision": rev}
    return out
