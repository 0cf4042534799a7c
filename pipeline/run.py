"""`python -m pipeline.run`: run the whole pipeline (or some stages of it) from one recipe.

    python -m pipeline.run --recipe tiny-cpu
    python -m pipeline.run --recipe paper-pythia-1.4b --output-dir runs/p14 reward.train.learning_rate=2e-6
    python -m pipeline.run --recipe tiny-cpu --stages calibration,report --force calibration
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m pipeline.run --recipe ...

Stages run in the order of `STAGES`; each is a module exposing `run(recipe, run_dir) -> list[str]` (the
artifact paths it wrote, relative to run_dir). Adding a stage is adding a module and a line here.

Bookkeeping lives in DIR/manifest.json (written atomically, by the main process only):

    {"stages": {name: {"status": "done"|"failed"|"running"|"skipped", "config_hash", "started", "finished",
                       "artifacts": [...], "artifact_files": {path: {"size", "mtime_ns", "sha256"}},
                       "reason", "upstream": {name: run_id}, "run_id", "error"?}},
     "versions": {...}, "git_commit": ..., "recipe": <resolved recipe>}

A stage is skipped when its entry is "done", its config hash (`pipeline.config.stage_config_hash`: own
section + data + seed + upstream hashes) is unchanged, all its artifacts exist with the recorded sizes
and contents (sha256, recomputed only for files whose mtime moved), and the upstream stages it consumed
have not been rerun since. Otherwise it runs, and so does every selected stage after it. `--force STAGE`
also passes `force=True` to a stage whose `run` accepts it (the reward stage, which otherwise reuses RMs
whose fingerprint matches).
A stage left "running" (kill -9) or "failed" (an exception, Ctrl-C) reruns with the same run_dir and
resumes from its own checkpoints; before it reruns, stale temporary files of interrupted atomic writes
(`.*.tmp` under DIR/<stage>/ and directly in DIR) are deleted. "skipped" marks a stage that never ran in
this directory because it was not selected. While it works, the main process holds an exclusive lock on
DIR/.lock, so a second `pipeline.run` on the same directory is refused instead of racing it.

Under `accelerate launch`/`torchrun` every rank runs every stage (the stages are data-parallel); the
main process decides the plan and broadcasts it, writes the manifest, and all ranks meet at a barrier
before and after each stage.

Each stage can also run alone: `python -m pipeline.<stage> --recipe ... --output-dir ... [--force]
[key.sub=value ...]` calls `main_for_stage("<stage>")`, which is `pipeline.run --stages <stage>` with the
same bookkeeping (so `accelerate launch ... -m pipeline.reward` gives one stage its own DeepSpeed setup).
A read-only run directory is fine when every selected stage is up to date (nothing is written); otherwise,
and for an --output-dir that is a file, the run stops with one message before any work.
Exit codes: 0 done, 2 a recipe/command-line error or a user-fixable failure inside a stage (bad data,
judge budget exhausted or endpoint unreachable, a disk full: one message, no traceback; a full disk names
the directory and an estimate of the space needed), 130 interrupted (Ctrl-C or SIGTERM; rerun the same
command to resume: only then is a resume hint printed); a failing stage raises with its traceback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from pipeline.align.judge import JudgeError
from pipeline.config import (
    RecipeError,
    check_recipe,
    describe_keys,
    load_recipe,
    recipe_to_dict,
    recipe_yaml,
    stage_config_hash,
)
from pipeline.io import (
    atomic_write_json,
    atomic_write_text,
    changed_files,
    dict_changes,
    file_records,
    is_hub_id,
    remove_tree,
)
from pipeline.logs import quiet_library_noise


# The pipeline, in order: (stage name, module exposing `run(recipe, run_dir) -> list[str]`).
STAGES: list[tuple[str, str]] = [
    ("reward", "pipeline.reward.stage"),
    ("calibration", "pipeline.calibration.stage"),
    ("align", "pipeline.align.stage"),
    ("report", "pipeline.report"),
]

MANIFEST = "manifest.json"
DATA_STAGES = {"reward", "calibration", "align"}  # stages that read data.sources
REPORT = "report"  # regenerated whenever a stage it reads from reruns, even when not selected
VERSION_PACKAGES = ("torch", "trl", "transformers", "accelerate", "deepspeed", "peft", "datasets")

log = logging.getLogger("pipeline.run")
FORCED = "forced (--force)"


def stage_names() -> list[str]:
    return [name for name, _ in STAGES]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------
# Processes: the main one decides and writes; everyone runs the stages.


class _Procs:
    """Rank info and collectives; a no-op for a single process (no torch import)."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # Without cpu=True, accelerate treats a CPU-only torchrun as ONE process (DistributedType.NO).
            # PartialState is a shared singleton: the stages' own PartialState()/Trainer reuse this one.
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.state is None else self.state.process_index

    @property
    def world(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, obj):
        """Main process's `obj` on every rank."""
        if self.state is None:
            return obj
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------------------------
# Manifest


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["python"] = platform.python_version()
    try:
        out["pipeline"] = importlib.metadata.version("more-rlhf-pipeline")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that was not pip-installed
        out["pipeline"] = None
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            import tomllib  # Python >= 3.11

            out["pipeline"] = tomllib.loads(pyproject.read_text())["project"]["version"] + " (source)"
        except (ImportError, OSError, KeyError, ValueError):
            pass
    return out


def git_commit() -> str | None:
    """HEAD of the git checkout holding this package (None for an installed wheel); '+dirty' if modified."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {"stages": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"{path} is not valid JSON ({e}); it is only ever written atomically, so it was edited by hand. "
            "Fix it, or delete it to rerun every stage."
        ) from None
    manifest.setdefault("stages", {})
    return manifest


def write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def missing_artifacts(run_dir: Path, artifacts: list[str]) -> list[str]:
    return [a for a in artifacts if not (Path(run_dir) / a).exists()]


def clean_stale_tmp(run_dir: Path, stage: str) -> list[str]:
    """Delete leftovers of interrupted atomic writes (`.<name>.<random>.tmp`) of one stage."""
    run_dir = Path(run_dir)
    removed = []
    candidates = list(run_dir.glob(".*.tmp"))
    if (run_dir / stage).is_dir():
        candidates += list((run_dir / stage).rglob(".*.tmp"))
    for p in candidates:
        if p.is_dir() and not p.is_symlink():
            remove_tree(p, run_dir)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(run_dir)))
    return removed


# ---------------------------------------------------------------------------------------------------
# Planning


def select_stages(stages: str | list[str] | None, recipe_stages: list[str] | None = None) -> list[str]:
    """Validate a --stages value (comma list) and return it in pipeline order."""
    valid = stage_names()
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
    order = stage_names()
    entries = manifest.get("stages", {})
    rerun: set[str] = set()
    steps = []
    for i, name in enumerate(order):
        h = stage_config_hash(recipe, name, order)
        entry = entries.get(name)
        upstream_now = upstream_tokens(entries, order[:i])
        if name not in selected:
            steps.append(_unselected_step(name, h, entry, upstream_now, [u for u in order[:i] if u in rerun]))
            if steps[-1]["action"] == "run":
                rerun.add(name)
            continue
        reason = None
        if name in force:
            reason = FORCED
        elif entry is None or entry.get("status") in (None, "skipped"):
            reason = "never run in this directory"
        elif entry["status"] == "running":
            reason = "interrupted while running: resuming from its checkpoints"
        elif entry["status"] == "failed":
            reason = f"previous attempt failed ({entry.get('error', 'unknown error')}): retrying"
        elif entry["status"] != "done":
            reason = f"status {entry['status']!r}"
        elif entry.get("config_hash") != h:
            reason = config_change_reason(entry, stage_inputs(recipe_to_dict(recipe), name, order), h)
        elif missing := missing_artifacts(run_dir, entry.get("artifacts", [])):
            reason = f"artifacts missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        elif changed := changed_files(run_dir, entry.get("artifact_files", {})):
            more = " ..." if len(changed) > 3 else ""
            reason = f"artifacts changed since it finished: {', '.join(changed[:3])}{more}"
        elif ups := [u for u in order[:i] if u in rerun]:
            reason = f"upstream stage {ups[-1]} reruns"
        elif entry.get("upstream", {}) != upstream_now:
            changed = sorted(set(entry.get("upstream", {}).items()) ^ set(upstream_now.items()))
            reason = f"upstream stage {changed[0][0]} was rerun since this stage finished"
        if reason is None:
            steps.append({"stage": name, "action": "skip", "hash": h, "reason": f"up to date (hash {h[:10]})"})
        else:
            rerun.add(name)
            steps.append({"stage": name, "action": "run", "hash": h, "reason": reason})
    return steps


def _unselected_step(name: str, h: str, entry: dict | None, upstream_now: dict, upstream_rerun: list[str]) -> dict:
    """A stage outside --stages: the report is regenerated when a stage it reads from reruns (or reran since
    it was written), so report.md never shows old numbers; any other finished stage is marked stale."""
    step = {"stage": name, "action": "exclude", "hash": h, "reason": "not selected"}
    if entry is None or entry.get("status") != "done":
        return step
    if upstream_rerun:
        why = f"upstream stage {upstream_rerun[-1]} reruns"
    elif entry.get("upstream", {}) != upstream_now:
        changed = sorted(set(entry.get("upstream", {}).items()) ^ set(upstream_now.items()))
        why = f"upstream stage {changed[0][0]} was rerun since this stage finished"
    else:
        return step
    if name == REPORT:
        return {**step, "action": "run", "reason": f"regenerated: {why}"}
    return {**step, "stale": why, "reason": f"not selected; its results are STALE ({why}): add it to --stages"}


def stage_inputs(resolved: dict, stage: str, order: list[str] | None = None) -> dict:
    """The parts of the resolved recipe a stage's config hash covers (seed, data, its own and every upstream
    section), stored in its manifest entry so a later plan can say which KEYS changed."""
    order = list(order or stage_names())
    upto = order[: order.index(stage) + 1] if stage in order else [stage]
    return {"seed": resolved.get("seed"), "data": resolved.get("data"), **{s: resolved.get(s) for s in upto}}


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
    for i, spec in enumerate(getattr(getattr(recipe, "data", None), "sources", None) or []):
        fmt = getattr(spec, "format", None)
        if fmt is None or fmt == "synthetic":
            continue
        path = spec.path or spec.name
        if not Path(path).expanduser().exists() and not is_hub_id(path):
            raise RecipeError(
                f"data.sources[{i}] ({spec.name!r}, format {fmt}): path {path!r} does not exist (resolved: "
                f"{Path(path).expanduser().resolve()}) and is not a hub id owner/name. Fix: correct the path "
                "(relative paths are taken from the working directory; data_root=DIR sets ${data_root})"
            )


def upstream_tokens(entries: dict, upstream: list[str]) -> dict[str, str]:
    """run_id of every finished upstream stage: a stage must rerun when one of these changes."""
    return {
        u: entries[u]["run_id"]
        for u in upstream
        if u in entries and entries[u].get("status") == "done" and entries[u].get("run_id")
    }


# ---------------------------------------------------------------------------------------------------
# Running


class StageInterrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so a terminated stage is recorded as failed like Ctrl-C."""


class DiskFull(OSError):
    """A stage ran out of disk space: one message naming the directory and about how much it needs."""


def interruption(e: BaseException) -> str:
    """How the run was interrupted, for messages ('Ctrl-C', 'terminated by signal 15')."""
    return str(e) or "Ctrl-C"


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_full_error(e: BaseException, run_dir: Path) -> OSError | None:
    """The out-of-space error behind `e` (an OSError ENOSPC/EDQUOT anywhere in its chain, or a failed write
    (torch and safetensors wrap it) while the run directory's file system has under 64 MiB free), else None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return x
    for x in _chain(e):
        text = str(x).lower()
        if "no space left" in text or ("write" in text and _free_bytes(run_dir) < 64 << 20):
            return OSError(errno.ENOSPC, str(x))
    return None


def _free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _du(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() else 0


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin", "*.pt") for f in Path(path).glob(pat))


def space_needed(recipe, run_dir: Path, stage: str) -> tuple[int, str]:
    """An estimate of the free space `stage` needs (bytes, and how it was estimated). The reward stage writes,
    per RM, a checkpoint (weights plus AdamW's two moments: 3x the weights) and the RM itself (1x)."""
    if stage == "reward":
        base = getattr(recipe.reward, "model_name_or_path", None)
        local = Path(base) if base and Path(base).is_dir() else Path(run_dir) / "reward" / ".base"
        weights = _weights_bytes(local)
        if weights:
            return 4 * weights, f"a checkpoint and a saved RM: 4x the {_human(weights)} of base model weights"
    written = _du(Path(run_dir) / stage)
    return written, f"at least what the {stage} stage had written when it failed"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_message(recipe, run_dir: Path, stage: str, err: OSError) -> str:
    where = Path(err.filename).parent if getattr(err, "filename", None) else Path(run_dir)
    try:
        need, how = space_needed(recipe, run_dir, stage)
    except OSError:  # files vanishing while they are counted
        need, how = 0, ""
    amount = f"about {_human(need)} more: {how}" if need else "more (no estimate: it had written nothing yet)"
    return (
        f"the {stage} stage ran out of disk space writing in {where} ({_human(_free_bytes(where))} free; it "
        f"needs {amount}). Fix: free space there or pass an --output-dir on a larger disk, then rerun the same "
        "command (finished work is kept)"
    )


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocesses
    raise StageInterrupted(f"terminated by signal {signum}")


def run_pipeline(
    recipe,
    run_dir: str | os.PathLike,
    stages: str | list[str] | None = None,
    force: list[str] | tuple[str, ...] = (),
    dry_run: bool = False,
) -> dict:
    """Run the selected stages of `recipe` in `run_dir`; return the final manifest (main process's)."""
    procs = _Procs()
    run_dir = Path(run_dir).resolve()
    selected = select_stages(stages, recipe.stages)
    force = list(force)
    if "all" in force:
        force = list(selected)
    bad = [f for f in force if f not in selected]
    if bad:
        raise RecipeError(
            f"--force {', '.join(bad)}: not among the selected stages ({', '.join(selected)}); "
            f"valid: {', '.join(stage_names())} or 'all'"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(
            f"the run directory {run_dir} (--output-dir or output_dir) is a file. Fix: pass a directory "
            "path (it is created when missing), or move the file away"
        )
    recipe.output_dir = str(run_dir)
    resolved = recipe_to_dict(recipe)

    # The main process locks the directory, reads the manifest and plans; a user error there is sent to
    # every rank (so no rank waits at a barrier for a main process that gave up).
    steps, manifest, lock, read_only = None, {}, None, None
    if procs.is_main:
        try:
            if not dry_run:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    lock = _lock_run_dir(run_dir)
                    with tempfile.TemporaryFile(dir=run_dir):  # a write probe (the lock file may already exist)
                        pass
                except OSError as e:
                    if not run_dir.is_dir():
                        raise RecipeError(
                            f"cannot create the run directory {run_dir} ({e.strerror or e}). Fix: pass "
                            "an --output-dir you can write to"
                        ) from None
                    read_only = e  # fine as long as every stage is up to date (nothing is written then)
            manifest = read_manifest(run_dir)
            steps = plan(recipe, run_dir, manifest, selected, force)
            running = [s["stage"] for s in steps if s["action"] == "run"]
            if read_only is not None and running:
                raise RecipeError(
                    f"the run directory {run_dir} is not writable ({read_only.strerror or read_only}) "
                    f"and stage(s) {', '.join(running)} must run. Fix: make it writable (chmod -R u+w) "
                    "or pass another --output-dir"
                )
            check_recipe(recipe, selected, align_runs="align" in running)
            if set(running) & DATA_STAGES:
                check_data_paths(recipe)
        except RecipeError as e:
            steps = {"error": str(e)}
    steps, read_only = procs.broadcast((steps, read_only is not None))
    if isinstance(steps, dict):
        if lock is not None:
            lock.close()
        raise RecipeError(steps["error"])

    try:
        if procs.is_main:
            _log_plan(recipe, run_dir, steps, procs.world)
        if dry_run:
            if procs.is_main:
                for line in estimate_lines(recipe, run_dir, steps, manifest, procs.world):
                    log.info("  %s", line)
            return manifest
        if read_only:
            if procs.is_main:
                log.info("every selected stage is up to date; %s is read-only, so nothing was written", run_dir)
            return manifest
        return _run_steps(recipe, run_dir, steps, manifest, resolved, procs)
    finally:
        if lock is not None:
            lock.close()


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on DIR/.lock for the main process (released by the kernel even on kill -9)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RecipeError(
            f"another pipeline.run is working in {run_dir} (DIR/.lock is held); wait for it to "
            "finish or use another --output-dir"
        ) from None
    except OSError:  # file systems without flock: run unlocked
        pass
    return f


def _run_steps(recipe, run_dir: Path, steps: list[dict], manifest: dict, resolved: dict, procs: _Procs) -> dict:
    if procs.is_main:
        manifest.update(versions=versions(), git_commit=git_commit(), recipe=resolved)
        for step in steps:
            entry = manifest["stages"].get(step["stage"])
            if step["action"] == "exclude" and entry is not None and entry.get("status") == "done":
                if step.get("stale"):  # read by the report and by the next plan
                    entry["stale"] = step["stale"]
                else:
                    entry.pop("stale", None)
            if step["action"] == "exclude" and step["stage"] not in manifest["stages"]:
                manifest["stages"][step["stage"]] = {
                    "status": "skipped",
                    "config_hash": step["hash"],
                    "started": None,
                    "finished": None,
                    "artifacts": [],
                    "reason": step["reason"],
                }
        atomic_write_text(run_dir / "recipe.yaml", recipe_yaml(recipe))
        write_manifest(run_dir, manifest)
    procs.barrier()

    modules = dict(STAGES)
    for step in steps:
        if step["action"] != "run":
            continue
        name = step["stage"]
        module = importlib.import_module(modules[name])  # fail early, before touching the manifest
        entry = None
        if procs.is_main:
            removed = clean_stale_tmp(run_dir, name)
            if removed:
                log.info("[%s] removed %d stale temporary file(s) of an interrupted write", name, len(removed))
            order = stage_names()
            entry = {
                "status": "running",
                "config_hash": step["hash"],
                "started": _now(),
                "finished": None,
                "artifacts": [],
                "reason": step["reason"],
                "run_id": uuid.uuid4().hex,
                "upstream": upstream_tokens(manifest["stages"], order[: order.index(name)]),
                "world_size": procs.world,
                "inputs": stage_inputs(resolved, name, order),
            }
            manifest["stages"][name] = entry
            write_manifest(run_dir, manifest)
            log.info("[%s] running: %s", name, step["reason"])
        procs.barrier()
        try:
            forced = {"force": True} if step["reason"] == FORCED and _accepts_force(module.run) else {}
            artifacts = module.run(recipe, run_dir, **forced) or []
            procs.barrier()
            if procs.is_main:
                artifacts = _normalize_artifacts(run_dir, name, artifacts)
                files = _artifact_records(run_dir, name, artifacts, manifest)
        except BaseException as e:
            full = None if isinstance(e, KeyboardInterrupt) else disk_full_error(e, run_dir)
            if full is not None:
                e = DiskFull(errno.ENOSPC, disk_full_message(recipe, run_dir, name, full))
            if procs.is_main:
                if isinstance(e, KeyboardInterrupt):
                    error = f"{type(e).__name__}: interrupted ({interruption(e)})"
                else:
                    error = f"{type(e).__name__}: {e.strerror if isinstance(e, DiskFull) else e}"
                entry.update(status="failed", finished=_now(), error=error[:500])
                try:
                    write_manifest(run_dir, manifest)
                except OSError as werr:  # the disk is full: say so, not a second traceback
                    log.error("[%s] could not record the failure in %s (%s)", name, MANIFEST, werr)
                if isinstance(e, KeyboardInterrupt):
                    log.error("[%s] interrupted (%s); the same command resumes it", name, interruption(e))
                else:
                    log.error("[%s] FAILED (%s)", name, error)
            if full is not None:
                raise e from None
            raise
        if procs.is_main:
            entry.update(status="done", finished=_now(), artifacts=artifacts, artifact_files=files)
            write_manifest(run_dir, manifest)
            log.info("[%s] done (%d artifacts)", name, len(artifacts))
    procs.barrier()
    if procs.is_main:
        stale = [s for s in steps if s.get("stale")]
        log.info("all selected stages are done: %s", run_dir)
        for s in stale:
            log.warning(
                "  %s is STALE (%s); its results predate it: rerun it with --stages %s",
                s["stage"],
                s["stale"],
                s["stage"],
            )
    return manifest


def _normalize_artifacts(run_dir: Path, stage: str, artifacts) -> list[str]:
    out = []
    for a in artifacts:
        p = Path(a)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(run_dir)
            except ValueError:
                raise RuntimeError(
                    f"stage {stage} returned artifact {a} outside the run directory {run_dir}"
                ) from None
        out.append(str(p))
    missing = missing_artifacts(run_dir, out)
    if missing:
        raise RuntimeError(f"stage {stage} reported artifacts it did not write: {', '.join(missing)}")
    return out


def _accepts_force(fn) -> bool:
    """Stages that keep finished sub-results of their own (the reward stage's RMs) take `force=True` to
    redo them too; the others rerun whole anyway."""
    import inspect

    return "force" in inspect.signature(fn).parameters


def _artifact_records(run_dir: Path, stage: str, artifacts: list[str], manifest: dict) -> dict:
    """Size, mtime and sha256 of every file of the stage's artifacts, checked before the stage is skipped
    (a truncated or edited artifact reruns it). Files another stage owns (e.g. calibration's
    reward/<rm>/temperature.json inside the reward stage's RM directory) are left to that stage."""
    others = set()
    for other, entry in manifest.get("stages", {}).items():
        if other != stage:
            others |= set(entry.get("artifact_files", {})) | set(entry.get("artifacts", []))
    return file_records(run_dir, artifacts, exclude=others)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def last_duration(entry: dict | None) -> float | None:
    """Seconds the stage's last finished run took (from the manifest), or None."""
    if not entry or entry.get("status") != "done" or not entry.get("started") or not entry.get("finished"):
        return None
    start, end = (_dt.datetime.fromisoformat(entry[k]) for k in ("started", "finished"))
    return (end - start).total_seconds()


def estimate_lines(recipe, run_dir: Path, steps: list[dict], manifest: dict, world: int = 1) -> list[str]:
    """For --dry-run: the work each stage that would run does (optimizer / generation steps) and a time
    estimate from what this directory measured before (the RMs' step time, the stage's last duration), or
    'unknown'. Nothing is invented: a number is shown only when it was measured here."""
    out = []
    entries = manifest.get("stages", {})
    for step in steps:
        if step["action"] != "run":
            continue
        name = step["stage"]
        last = last_duration(entries.get(name))
        took = f"its last run here took {_clock(last)} (inputs may have changed since)" if last else None
        module = dict(STAGES).get(name)
        if name == "reward" and module == "pipeline.reward.stage":
            from pipeline.reward.stage import measured_step_seconds, planned_steps

            counts = planned_steps(recipe, world=world)
            total = sum(counts.values())
            work = (
                f"{len(counts)} RMs, {total} optimizer steps ("
                + ", ".join(f"RM {i} of {len(counts)} {rm}: {n}" for i, (rm, n) in enumerate(counts.items(), 1))
                + ")"
            )
            sec = measured_step_seconds(run_dir)
            when = "training time unknown (no step time measured in this directory yet)"
            if sec:
                when = f"training about {_clock(sec * total)} at the {sec:.3g} s/step measured in this directory"
            when += f"; {took}" if took else ""
        elif name == "align" and module == "pipeline.align.stage":
            work = align_workload(recipe)
            when = took or "time unknown (never run in this directory)"
        else:
            work = f"{name}: no optimizer steps" if name in ("calibration", "report") else f"{name}: work unknown"
            when = took or "time unknown (never run in this directory)"
        out.append(f"{name:12s} {work}; {when}")
    return out


def align_workload(recipe) -> str:
    """The align stage's counts from its settings: warm-start steps, samples to generate, RMs and methods."""
    cfg = getattr(recipe, "align", None)
    if cfg is None:
        return "align: unknown workload"
    parts = []
    if not getattr(cfg, "model_name_or_path", None):
        parts.append(f"{cfg.warm_start_steps} warm-start steps (tiny policy, unless already built)")
    rms = list(cfg.rms) if getattr(cfg, "rms", None) else [m for m in recipe.reward.methods if m != "single"]
    prompts = "all" if cfg.n_prompts is None else cfg.n_prompts
    parts.append(f"{len(rms)} RM(s) x methods {', '.join(cfg.methods)}")
    parts.append(f"sampling {prompts} training prompts x {cfg.n} responses")
    if "ppo" in cfg.methods:
        parts.append(f"ppo {cfg.ppo.get('num_steps', 100)} steps per RM")
    return "; ".join(parts)


def _log_plan(recipe, run_dir: Path, steps: list[dict], world: int) -> None:
    log.info("recipe %s -> %s (%d process%s)", recipe.name, run_dir, world, "es" if world > 1 else "")
    for s in steps:
        log.info("  %-12s %-7s %s", s["stage"], s["action"].upper(), s["reason"])


# ---------------------------------------------------------------------------------------------------
# Command lines


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    prog = f"python -m pipeline.{stage}" if stage else "python -m pipeline.run"
    desc = (
        f"Run the {stage} stage of a recipe alone (same bookkeeping as pipeline.run --stages {stage})."
        if stage
        else "Run the MORE pipeline from a recipe, skipping stages that are already done."
    )
    p = argparse.ArgumentParser(prog=prog, description=desc)
    p.add_argument(
        "--recipe",
        default="tiny-cpu",
        help="preset name (pipeline/recipes/*.yaml) or a path to a YAML file (default: tiny-cpu)",
    )
    p.add_argument("--output-dir", default=None, help="run directory (default: the recipe's output_dir)")
    if stage is None:
        p.add_argument(
            "--stages",
            default=None,
            help=f"comma-separated subset to run, in pipeline order: {','.join(stage_names())}",
        )
        p.add_argument(
            "--force",
            action="append",
            default=[],
            metavar="STAGE",
            help="rerun STAGE even if up to date (repeatable; 'all' reruns every selected stage)",
        )
    else:
        p.add_argument("--force", action="store_true", help="rerun the stage even if it is up to date")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be skipped, and why")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument("--show-keys", action="store_true", help="list every recipe key with its help, and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override any recipe field, e.g. reward.methods=[more,multitask] seed=3",
    )
    return p


def main(argv: list[str] | None = None, *, stage: str | None = None) -> int:
    """Entry point of `python -m pipeline.run` (and, with `stage`, of each stage's __main__)."""
    args = build_parser(stage).parse_intermixed_args(argv)
    _setup_logging()
    quiet_library_noise()
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.show_keys:
            print(f"{'key':45s} {'type':22s} {'default':24s} help")
            for key, tp, default, help_ in describe_keys():
                print(f"{key:45s} {tp:22s} {default:24s} {help_}")
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            print(recipe_yaml(recipe), end="")
            return 0
        run_dir = args.output_dir or recipe.resolved_output_dir()
        if stage is None:
            stages, force = args.stages, args.force
        else:
            stages, force = [stage], ([stage] if args.force else [])
        run_pipeline(recipe, run_dir, stages=stages, force=force, dry_run=args.dry_run)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        shutdown_distributed(clean=False)
        return 2
    except (FileNotFoundError, ValueError, JudgeError) as e:
        # User-caused errors inside a stage (missing file, malformed record, bad value) carry one clear
        # message; the manifest already marks the stage failed. PIPELINE_TRACEBACK=1 shows the traceback.
        if os.environ.get("PIPELINE_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {e}\n(set PIPELINE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({interruption(e)}); run the same command again to resume", file=sys.stderr)
        shutdown_distributed(clean=False)
        return 130
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    return 0


def shutdown_distributed(clean: bool = True) -> None:
    """Tear down DeepSpeed engines and the process group before the interpreter exits.

    Left to interpreter shutdown, the order in which the gloo communicator threads and the engines'
    hooks are destroyed varies, and a rank can abort at exit ("terminate called without an active
    exception", SIGABRT) after all its work is done. `clean`: the ranks meet at a barrier first (only
    when none of them failed, or it would wait for a dead rank)."""
    if "torch" not in sys.modules:
        return
    import gc

    import torch.distributed as dist

    gc.collect()  # drop trainers/engines (and their communication hooks) that are no longer referenced
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: still release this rank's group
            pass
    dist.destroy_process_group()


def main_for_stage(stage: str, argv: list[str] | None = None) -> int:
    """CLI of one stage, for `pipeline/<stage>/__main__.py`:

        import sys
        from pipeline.run import main_for_stage
        sys.exit(main_for_stage("reward"))

    Accepts `--recipe NAME|PATH --output-dir DIR [--force] [--dry-run] [key.sub=value ...]` and runs
    only that stage with the manifest bookkeeping of `pipeline.run` (skipped when up to date unless
    --force). Returns the process exit code.
    """
    if stage not in stage_names():
        raise ValueError(f"unknown stage {stage!r}; valid: {stage_names()}")
    return main(argv, stage=stage)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _setup_logging() -> None:
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK")
        prefix = f"[pipeline rank {rank}]" if rank not in (None, "0") else "[pipeline]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
