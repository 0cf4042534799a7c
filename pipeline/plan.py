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

import json
import os
from pathlib import Path

import yaml

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
    """Why a selected stage must run (None: it is up to date): every reason that applies, short, each naming
    what changed (a key, a file, a stage)."""
    if forced:
        return FORCED
    status = None if entry is None else entry.get("status")
    if status in (None, "skipped"):
        return "never run in this directory"
    reasons = [] if status == "done" else [last_end(entry)]
    if entry.get("config_hash") != h:
        reasons.append(config_change_reason(entry, stage_inputs(resolved, name), h, input_digests(resolved, name)))
    if status == "done":
        if missing := missing_artifacts(run_dir, entry.get("artifacts", [])):
            reasons.append(f"artifacts missing: {_some(missing)}")
        changed = changed_files(run_dir, entry.get("artifact_files", {}))
        if changed := [c for c in changed if c.rsplit(" (", 1)[0] not in missing]:
            reasons.append(f"artifacts changed since it finished: {_some(changed)}")
    if why := _upstream_reason(entry, upstream_now, upstream_rerun):
        reasons.append(why)
    return "; ".join(reasons) or None


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _short(text: str, width: int = 80) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else "no message"
    return line if len(line) <= width else line[: width - 3] + "..."


def last_end(entry: dict) -> str:
    """How the stage's previous attempt ended, when it did not finish: interrupted (Ctrl-C, SIGTERM: status
    "interrupted"), killed without a word (left "running": kill -9, a crash of the machine), or failed (its
    error's first line, short; the whole message stays in the manifest)."""
    status = entry.get("status")
    if status == "running":
        return "its last run was killed before it could record how it ended (kill -9?): resuming"
    if status == "interrupted":
        return f"{_short(entry.get('error') or 'interrupted')} last time: resuming"
    if status == "failed":
        return f"failed last time ({_short(entry.get('error', 'unknown error'))}): retrying"
    return f"status {status!r}"


def _upstream_reason(entry: dict, upstream_now: dict, upstream_rerun: list[str]) -> str | None:
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
    why = _upstream_reason(entry, upstream_now, upstream_rerun)
    if why is None:
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


def config_change_reason(entry: dict, inputs_now: dict, h: str, files_now: dict | None = None) -> str:
    """'config changed: reward.train.learning_rate: 0.0001 -> 0.0005' from the inputs recorded in the manifest,
    and 'input changed: /data/hh.jsonl (content)' for every local input file whose content (or hub id whose
    revision) differs from the record (`input_digests`); the hashes only when an older manifest recorded
    neither."""
    old = entry.get("inputs")
    parts = []
    if isinstance(old, dict) and (changes := dict_changes(old, inputs_now)):
        parts.append("config changed: " + changes)
    if isinstance(entry.get("input_files"), dict) and files_now is not None:
        if changed := changed_inputs(entry["input_files"], files_now):
            parts.append(f"input changed: {_some(changed)}")
    if parts:
        return "; ".join(parts)
    if isinstance(old, dict):
        return "a local input file or a hub revision changed (its content; this manifest names no files)"
    return f"config changed (hash {str(entry.get('config_hash'))[:10]} -> {h[:10]})"


def input_digests(d: dict, stage: str) -> dict:
    """{path or hub id: {file relative to it ('.' for the path itself): sha256} or {"hub_revision": ...}} of
    the local inputs of `stage` and of every stage before it (what its hash covers), stored in its manifest
    entry so a later plan can name the file that changed."""
    order = stage_table.stage_names()
    out: dict = {}
    for s in order[: order.index(stage) + 1] if stage in order else [stage]:
        for p, rec in local_input_stats(d, s).items():
            out[p] = {(f or "."): sha for f, _size, sha in rec} if isinstance(rec, list) else rec
    return out


def changed_inputs(old: dict, new: dict) -> list[str]:
    """'PATH (content)', 'PATH: FILE (content)', 'PATH (missing now)', 'HUB-ID (revision ...)' for every input
    whose record differs."""
    out = []
    for p in sorted(set(old) | set(new)):
        a, b = old.get(p), new.get(p)
        if a == b:
            continue
        if b is None:
            out.append(f"{p} (missing now)")
        elif a is None:
            out.append(f"{p} (new input)")
        elif "hub_revision" in a or "hub_revision" in b:
            out.append(f"{p} (hub revision {str(a.get('hub_revision'))[:10]} -> {str(b.get('hub_revision'))[:10]})")
        elif list(a) == ["."] and list(b) == ["."]:
            out.append(f"{p} (content)")
        else:
            files = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            out.append(f"{p}: {_some(files, 2)} (content)" if files else f"{p} (content)")
    return out


ALLOW_STALE_UPSTREAM = "--allow-stale-upstream"


def check_upstream(recipe, run_dir: Path, steps: list[dict], allow: bool = False) -> None:
    """Refuse, before any work (--dry-run too), to run a stage on results of an earlier stage that does not
    rerun now and whose saved results were produced with other settings than this recipe says (the stage
    table's `mismatch`: the RMs' fingerprints against reward.*): one message naming every key with both values
    and the two ways on. With `allow` (--allow-stale-upstream) it goes on, and every consuming step carries
    `upstream_mismatch` = {"stage", "results", "keys"} (logged as a warning, recorded in its manifest entry,
    shown in report.md beside its numbers)."""
    running = [s["stage"] for s in steps if s["action"] == "run"]
    for i, stage in enumerate(stage_table.STAGES):
        if stage.mismatch is None or stage.name in running:
            continue
        users = [s.name for s in stage_table.STAGES[i + 1 :] if s.name in running]
        found = stage.mismatch(recipe, run_dir) if users else []
        if not found:
            continue
        where = Path(run_dir) / stage.name
        text = mismatch_text(found, stage.results)
        if not allow:
            raise RecipeError(_refusal(stage, where, users, found, text))
        for step in steps:
            if step["stage"] in users:
                step["upstream_mismatch"] = {"stage": stage.name, "results": stage.results, "keys": text}


def mismatch_text(found: list[dict], results: str = "results") -> str:
    """'reward.train.learning_rate: 0.0005 in the RMs (more, multitask), 0.001 in the recipe; ...'."""
    parts = []
    for m in found:
        recorded = "; ".join(
            f"{_yaml(json.loads(v))} in {results} {', '.join(names)}" for v, names in m["recorded"].items()
        )
        parts.append(f"{m['key']}: {recorded} vs {_yaml(m['recipe'])} in the recipe")
    return "; ".join(parts)


def _refusal(stage, where: Path, users: list[str], found: list[dict], text: str) -> str:
    """The one-line refusal: the keys on both sides, the two ways on, and the flag."""
    single = [m for m in found if len(m["recorded"]) == 1]
    repeat = " ".join(f"{m['key']}={_yaml(json.loads(next(iter(m['recorded']))))}" for m in single)
    order = stage_table.stage_names()
    rerun = ",".join(s for s in order if s == stage.name or s in users)
    ways = (
        f"repeat the settings they were produced with ({repeat}), or "
        if len(single) == len(found)
        else (f"the {stage.results} disagree among themselves, so ")
    )
    return (
        f"this recipe disagrees with the {stage.results} in {where} that {', '.join(users)} would use: {text}. "
        f"Fix: {ways}rerun the {stage.name} stage with this recipe (--stages {rerun}); or pass "
        f"{ALLOW_STALE_UPSTREAM} to go on with them as they are (the log and report.md then carry a warning)"
    )


def _yaml(value) -> str:
    """A value as an override writes it (YAML flow style: 0.0005, none, null, [a, b])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


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
