"""`python -m pipeline.run`: run the whole pipeline (or some stages of it) from one recipe.

    python -m pipeline.run --recipe tiny-cpu
    python -m pipeline.run --recipe paper-pythia-1.4b --output-dir runs/p14 reward.train.learning_rate=2e-6
    python -m pipeline.run --recipe tiny-cpu --stages calibration,report --force calibration
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m pipeline.run --recipe ...

Stages run in the order of `pipeline.stages.STAGES`, the one table of stages (an on-demand stage, the
policy's, is added to the selection whenever a selected stage reads it); `pipeline.plan` decides which run and why, and DIR/manifest.json (`pipeline.manifest`, written by the main process only) records what ran.
`--force STAGE` reruns a stage and passes it `force=True` (the reward stage then retrains RMs it would
otherwise reuse). A stage left "running" (kill -9), "interrupted" (Ctrl-C, SIGTERM) or "failed" (an exception)
reruns with the same run_dir and resumes from its own checkpoints; before it reruns, stale temporary files of interrupted atomic
writes (`.*.tmp` under DIR/<stage>/ and directly in DIR) are deleted. "skipped" marks a stage that never ran
in this directory because it was not selected. While it works, the main process holds an exclusive lock on
DIR/.lock, so a second `pipeline.run` on the same directory is refused instead of racing it.

Under `accelerate launch`/`torchrun` every rank runs every stage (the stages are data-parallel); the
main process decides the plan and broadcasts it, writes the manifest, and all ranks meet at a barrier
before and after each stage (`pipeline.dist`).

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
import errno
import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

from pipeline import stages as stage_table
from pipeline.align.judge import JudgeError
from pipeline.config import check_recipe, load_recipe, recipe_to_dict, recipe_yaml
from pipeline.config_keys import describe_keys
from pipeline.dist import Processes, shutdown_distributed, threading_is_main
from pipeline.errors import (
    DiskFull,
    RecipeError,
    StageInterrupted,
    disk_full_error,
    disk_full_message,
    interruption,
    redact_credentials,
)
from pipeline.io import UnsafePathError, atomic_write_text, check_no_links_out, tree_bytes
from pipeline.logs import clock, quiet_library_noise
from pipeline.manifest import (
    MANIFEST,
    artifact_records,
    clean_stale_tmp,
    git_commit,
    last_duration,
    normalize_artifacts,
    now,
    read_manifest,
    recorded_recipe,
    upstream_tokens,
    versions,
    write_manifest,
)
from pipeline.plan import (
    ALLOW_STALE_UPSTREAM,
    FORCED,
    check_data_paths,
    check_upstream,
    input_digests,
    plan,
    select_stages,
    stage_inputs,
)


log = logging.getLogger("pipeline.run")


def run_pipeline(
    recipe,
    run_dir: str | os.PathLike,
    stages: str | list[str] | None = None,
    force: list[str] | tuple[str, ...] = (),
    dry_run: bool = False,
    allow_stale_upstream: bool = False,
) -> dict:
    """Run the selected stages of `recipe` in `run_dir`; return the final manifest (main process's).
    `allow_stale_upstream` goes on where the recipe disagrees with the saved results of a stage that does not
    rerun (`pipeline.plan.check_upstream`; refused otherwise)."""
    procs = Processes()
    run_dir = Path(run_dir).resolve()
    selected = stage_table.needed(select_stages(stages, recipe.stages), recipe_to_dict(recipe))
    force = _forced(force, selected)
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
            _check_links(run_dir)
            lock, read_only = (None, None) if dry_run else _open_run_dir(run_dir)
            manifest = read_manifest(run_dir)
            steps = _decide(recipe, run_dir, manifest, selected, force, read_only, allow_stale_upstream)
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


def _forced(force, selected: list[str]) -> list[str]:
    force = list(force)
    if "all" in force:
        return list(selected)
    bad = [f for f in force if f not in selected]
    if bad:
        raise RecipeError(
            f"--force {', '.join(bad)}: not among the selected stages ({', '.join(selected)}); "
            f"valid: {', '.join(stage_table.stage_names())} or 'all'"
        )
    return force


def _check_links(run_dir: Path) -> None:
    """Before anything is written: no stage folder, and nothing under one, is a symlink leading out of the run
    directory (a write would follow it); one RecipeError naming the link (`pipeline.io.check_no_links_out`)."""
    try:
        check_no_links_out(run_dir, stage_table.stage_names())
    except UnsafePathError as e:
        raise RecipeError(str(e)) from None


def _open_run_dir(run_dir: Path):
    """(lock, None) for a writable run directory (created when missing); (None, the OSError) for a read-only
    one, which is fine as long as every stage is up to date."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock_run_dir(run_dir)
        with tempfile.TemporaryFile(dir=run_dir):  # a write probe (the lock file may already exist)
            pass
        return lock, None
    except OSError as e:
        if not run_dir.is_dir():
            raise RecipeError(
                f"cannot create the run directory {run_dir} ({e.strerror or e}). Fix: pass an --output-dir you "
                "can write to"
            ) from None
        return None, e


def _decide(
    recipe, run_dir: Path, manifest: dict, selected: list[str], force: list[str], read_only, allow_stale: bool = False
) -> list[dict]:
    """The plan, after the checks that need it (a read-only directory, the stages' checks, data paths, the saved
    results of upstream stages against this recipe)."""
    steps = plan(recipe, run_dir, manifest, selected, force)
    running = [s["stage"] for s in steps if s["action"] == "run"]
    if read_only is not None and running:
        raise RecipeError(
            f"the run directory {run_dir} is not writable ({read_only.strerror or read_only}) "
            f"and stage(s) {', '.join(running)} must run. Fix: make it writable (chmod -R u+w) "
            "or pass another --output-dir"
        )
    check_recipe(recipe, selected, running)
    if any(stage_table.get(s).reads_data for s in running):
        check_data_paths(recipe)
    check_upstream(recipe, run_dir, steps, allow=allow_stale)
    return steps


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on DIR/.lock for the main process (released by the kernel even on kill -9)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = run_dir / ".lock"
    try:  # never through a link: O_NOFOLLOW fails on one instead of creating or locking its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if not path.is_symlink():
            raise
        raise RecipeError(
            f"{path} is a symlink (to {os.readlink(path)}); the lock file is never created or opened through a "
            f"link ({e.strerror}). Fix: delete the link (rm {path})"
        ) from None
    f = os.fdopen(fd, "a+")
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


# ---------------------------------------------------------------------------------------------------
# Running


def _run_steps(recipe, run_dir: Path, steps: list[dict], manifest: dict, resolved: dict, procs: Processes) -> dict:
    if procs.is_main:
        _record_plan(run_dir, steps, manifest, resolved, recipe)
    procs.barrier()
    for step in steps:
        if step["action"] == "run":
            _run_stage(recipe, run_dir, step, manifest, resolved, procs)
    procs.barrier()
    if procs.is_main:
        log.info("all selected stages are done: %s", run_dir)
        for s in steps:
            if s.get("stale"):
                log.warning(
                    "  %s is STALE (%s); its results predate it: rerun it with --stages %s",
                    s["stage"],
                    s["stale"],
                    s["stage"],
                )
    return manifest


def _record_plan(run_dir: Path, steps: list[dict], manifest: dict, resolved: dict, recipe) -> None:
    """Before any stage runs: versions, the resolved recipe, stale marks and 'skipped' entries."""
    manifest.update(versions=versions(), git_commit=git_commit(), recipe=resolved)
    for step in steps:
        entry = manifest["stages"].get(step["stage"])
        if step["action"] != "exclude":
            continue
        if entry is not None and entry.get("status") == "done":
            if step.get("stale"):  # read by the report and by the next plan
                entry["stale"] = step["stale"]
            else:
                entry.pop("stale", None)
        if entry is None:
            manifest["stages"][step["stage"]] = {
                "status": "skipped",
                "config_hash": step["hash"],
                "started": None,
                "finished": None,
                "artifacts": [],
                "reason": step["reason"],
            }
    write_manifest(run_dir, manifest)
    write_run_recipe(run_dir, manifest)


RECIPE_HEADER = """\
# The settings this run directory's results were produced with: each stage's section as that stage last ran
# here (manifest.json records them), not the recipe of the last command. Stages that never ran here are left
# out, and `stages` lists those that did. To reproduce them elsewhere:
#   python -m pipeline.run --recipe {path} --output-dir NEW_DIR
"""


def write_run_recipe(run_dir: Path, manifest: dict, current: str | None = None) -> None:
    """DIR/recipe.yaml from the manifest (`recorded_recipe`: every section as its stage last ran here; `current`
    is the stage starting now). Removed while no stage has run here, so it never describes a run that did not
    happen. A credential inside a URL is masked, as in manifest.json."""
    data, notes = recorded_recipe(manifest, current)
    path = Path(run_dir) / "recipe.yaml"
    if data is None:
        path.unlink(missing_ok=True)
        return
    header = RECIPE_HEADER.format(path=path) + "".join(f"# Note: {redact_credentials(n)}\n" for n in notes)
    text = yaml.safe_dump(redact_credentials(data), sort_keys=False, allow_unicode=True)  # as recipe_yaml masks
    atomic_write_text(path, header + text)


def _run_stage(recipe, run_dir: Path, step: dict, manifest: dict, resolved: dict, procs: Processes) -> None:
    name = step["stage"]
    stage = stage_table.get(name)
    entry = None
    if procs.is_main:
        removed = clean_stale_tmp(run_dir, name)
        if removed:
            log.info("[%s] removed %d stale temporary file(s) of an interrupted write", name, len(removed))
        entry = {
            "status": "running",
            "config_hash": step["hash"],
            "started": now(),
            "finished": None,
            "artifacts": [],
            "reason": step["reason"],
            "run_id": uuid.uuid4().hex,
            "upstream": upstream_tokens(manifest["stages"], stage_table.upstream(name, resolved)),
            "world_size": procs.world,
            "inputs": stage_inputs(resolved, name),
            "input_files": input_digests(resolved, name),
        }
        if step.get("upstream_mismatch"):  # --allow-stale-upstream: the report shows it beside the numbers
            entry["upstream_mismatch"] = step["upstream_mismatch"]
        manifest["stages"][name] = entry
        write_manifest(run_dir, manifest)
        write_run_recipe(run_dir, manifest, current=name)
        log.info("[%s] running: %s", name, step["reason"])
    procs.barrier()
    try:
        artifacts = stage.run(recipe, run_dir, force=step["reason"] == FORCED) or []
        procs.barrier()
        if procs.is_main:
            artifacts = normalize_artifacts(run_dir, name, artifacts)
            files = artifact_records(run_dir, name, artifacts, manifest)
    except BaseException as e:
        _record_failure(recipe, run_dir, stage, e, entry, manifest, procs)
        raise
    if procs.is_main:
        entry.update(status="done", finished=now(), artifacts=artifacts, artifact_files=files)
        write_manifest(run_dir, manifest)
        write_run_recipe(run_dir, manifest)
        log.info("[%s] done (%d artifacts)", name, len(artifacts))


def _record_failure(recipe, run_dir: Path, stage, e: BaseException, entry, manifest: dict, procs: Processes):
    """Mark the stage failed in the manifest and say how; a full disk is raised as one DiskFull line."""
    full = None if isinstance(e, KeyboardInterrupt) else disk_full_error(e, run_dir)
    if full is not None:
        need, how = _space_needed(recipe, run_dir, stage)
        e = DiskFull(errno.ENOSPC, disk_full_message(stage.name, run_dir, full, need, how))
    if procs.is_main:
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM: an interruption, not a failure
            status, error = "interrupted", f"interrupted ({interruption(e)})"
        else:
            status = "failed"
            error = redact_credentials(f"{type(e).__name__}: {e.strerror if isinstance(e, DiskFull) else e}")
        entry.update(status=status, finished=now(), error=error[:500])
        try:
            write_manifest(run_dir, manifest)
            write_run_recipe(run_dir, manifest)
        except OSError as werr:  # the disk is full: say so, not a second traceback
            log.error("[%s] could not record the failure in %s (%s)", stage.name, MANIFEST, werr)
        if isinstance(e, KeyboardInterrupt):
            log.error("[%s] interrupted (%s); the same command resumes it", stage.name, interruption(e))
        else:
            log.error("[%s] FAILED (%s)", stage.name, error)
    if full is not None:
        raise e from None


def _space_needed(recipe, run_dir: Path, stage) -> tuple[int, str]:
    """The stage's own estimate of the free space it needs, else what it had written when it failed."""
    try:
        estimate = stage.space_needed(recipe, run_dir) if stage.space_needed else None
        if estimate:
            return estimate
        return tree_bytes(
            Path(run_dir) / stage.name
        ), f"at least what the {stage.name} stage had written when it failed"
    except OSError:  # files vanishing while they are counted
        return 0, ""


def estimate_lines(recipe, run_dir: Path, steps: list[dict], manifest: dict, world: int = 1) -> list[str]:
    """For --dry-run: the work each stage that would run does (its `estimate`: optimizer / generation steps)
    and a time estimate from what this directory measured before (the RMs' step time, the stage's last
    duration), or 'unknown'. Nothing is invented: a number is shown only when it was measured here."""
    out = []
    entries = manifest.get("stages", {})
    for step in steps:
        if step["action"] != "run":
            continue
        name = step["stage"]
        stage = stage_table.get(name)
        last = last_duration(entries.get(name))
        took = f"its last run here took {clock(last)} (inputs may have changed since)" if last else None
        work, when = stage.estimate(recipe, run_dir, world) if stage.estimate else (f"{name}: work unknown", None)
        if when is None:
            when = took or "time unknown (never run in this directory)"
        elif took:
            when += f"; {took}"
        out.append(f"{name:12s} {work}; {when}")
    return out


def _log_plan(recipe, run_dir: Path, steps: list[dict], world: int) -> None:
    log.info("recipe %s -> %s (%d process%s)", recipe.name, run_dir, world, "es" if world > 1 else "")
    for s in steps:
        log.info("  %-12s %-7s %s", s["stage"], s["action"].upper(), s["reason"])
    for s in steps:
        if m := s.get("upstream_mismatch"):
            log.warning(
                "WARNING (%s): %s runs on the %s in %s/, produced with other settings than this recipe: %s",
                ALLOW_STALE_UPSTREAM,
                s["stage"],
                m["results"],
                m["stage"],
                m["keys"],
            )


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
            help=f"comma-separated subset to run, in pipeline order: {','.join(stage_table.stage_names())}",
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
    p.add_argument(
        ALLOW_STALE_UPSTREAM,
        action="store_true",
        help="run stages on saved upstream results (the RMs in DIR/reward) that were produced with other "
        "settings than this recipe says; refused without it (the message names the keys and values on both "
        "sides). The log and report.md then carry a warning beside the numbers",
    )
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    p.add_argument("--show-keys", action="store_true", help="list every recipe key with its help, and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override any recipe field, e.g. reward.methods=[more,multitask] seed=3",
    )
    return p


def on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocesses
    raise StageInterrupted(f"terminated by signal {signum}")


def main(argv: list[str] | None = None, *, stage: str | None = None) -> int:
    """Entry point of `python -m pipeline.run` (and, with `stage`, of each stage's __main__)."""
    args = build_parser(stage).parse_intermixed_args(argv)
    setup_logging()
    quiet_library_noise()
    if threading_is_main():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _main(args, stage)
    except RecipeError as e:
        print(f"error: {redact_credentials(str(e))}", file=sys.stderr)
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
        message = redact_credentials(f"{type(e).__name__}: {e}")
        print(f"error: {message}\n(set PIPELINE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({interruption(e)}); run the same command again to resume", file=sys.stderr)
        shutdown_distributed(clean=False)
        return 130
    except BaseException:
        shutdown_distributed(clean=False)
        raise


def _main(args, stage: str | None) -> int:
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
    if not args.dry_run and os.environ.get("RANK", "0") == "0":
        log.info(stop_hint())
    run_pipeline(
        recipe,
        run_dir,
        stages=stages,
        force=force,
        dry_run=args.dry_run,
        allow_stale_upstream=args.allow_stale_upstream,
    )
    shutdown_distributed()
    return 0


def stop_hint() -> str:
    """Which signals stop this run: SIGTERM always; SIGINT (Ctrl-C) unless the process started with it ignored
    (`nohup ... &` from a script), where a Ctrl-C or kill -INT would otherwise do nothing without a word."""
    pid = os.getpid()
    if threading_is_main() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (
            f"to stop this run: kill {pid} (SIGTERM). SIGINT is ignored in this process (it was started with SIGINT "
            "ignored, e.g. nohup ... &), so Ctrl-C and kill -INT do nothing; the same command resumes"
        )
    return f"to stop this run: Ctrl-C (SIGINT) or kill {pid} (SIGTERM); the same command resumes"


def main_for_stage(stage: str, argv: list[str] | None = None) -> int:
    """CLI of one stage, for `pipeline/<stage>/__main__.py`:

        import sys
        from pipeline.run import main_for_stage
        sys.exit(main_for_stage("reward"))

    Accepts `--recipe NAME|PATH --output-dir DIR [--force] [--dry-run] [key.sub=value ...]` and runs
    only that stage with the manifest bookkeeping of `pipeline.run` (skipped when up to date unless
    --force). Returns the process exit code.
    """
    if stage not in stage_table.stage_names():
        raise ValueError(f"unknown stage {stage!r}; valid: {stage_table.stage_names()}")
    return main(argv, stage=stage)


def setup_logging() -> None:
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("RANK")
        prefix = f"[pipeline rank {rank}]" if rank not in (None, "0") else "[pipeline]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
