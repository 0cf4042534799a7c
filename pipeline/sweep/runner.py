"""Running a sweep's runs: in this process, one after the other (`run_sequential`), or N at a time as
`python -m pipeline.run` subprocesses (`run_parallel`).

Runs go through `pipeline.run.run_pipeline`, so its manifest decides what is done (`run_state`): a finished run
is skipped, an interrupted one (Ctrl-C, kill, a failure) resumes from its stage checkpoints when the same sweep
command is run again. Sequential runs are in-process (under `accelerate launch` or `torchrun` every process
joins every run); `--parallel N` runs subprocesses, one process each, torch threads split between them, logs in
each run's sweep.log. A run that fails is reported and the sweep goes on with the others.

Imports: pipeline.run (inside the functions that use it), pipeline.config and
pipeline.sweep.grid. The `exporter` the runners take (an `Exporter` of --export, or None) is passed in, not
imported: pipeline.sweep.export prints through this module's `_say`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import load_recipe
from pipeline.dist import is_main_process, world_size
from pipeline.sweep.grid import SweepRun


def run_state(recipe, run_dir: Path, stages) -> tuple[str, str]:
    """('done' | 'todo', why) from the run's manifest: done when every selected stage is up to date."""
    from pipeline.run import plan, read_manifest, select_stages

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        return "todo", "never run"
    selected = select_stages(stages, recipe.stages)
    steps = plan(recipe, run_dir, read_manifest(run_dir), selected, [])
    todo = [s for s in steps if s["action"] == "run"]
    if not todo:
        return "done", "every selected stage is up to date"
    return "todo", f"{todo[0]['stage']}: {todo[0]['reason']}"


def _say(msg: str) -> None:
    """A sweep progress line on stderr, from the main process only (stdout belongs to the runs' stages)."""
    if is_main_process():
        print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def run_sequential(recipe_arg: str, runs: list[SweepRun], stages, exporter=None) -> dict[str, str]:
    """Run each run in this process (all processes of an `accelerate launch` join each one)."""
    from pipeline.run import run_pipeline

    failed: dict[str, str] = {}
    for i, r in enumerate(runs, 1):
        if exporter and exporter.is_exported(r):
            _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: exported, skipped")
            continue
        recipe = load_recipe(recipe_arg, r.overrides)
        state, why = run_state(recipe, Path(r.dir), stages)
        if state == "done":
            _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: done, skipped")
            if exporter and is_main_process():
                exporter.export(r)
            continue
        _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: running ({why}) -> {r.dir}")
        t0 = time.time()
        try:
            run_pipeline(recipe, r.dir, stages=stages)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
            if world_size() > 1:
                raise
            failed[r.dir] = f"{type(e).__name__}: {e}"[:300]
            _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: FAILED ({failed[r.dir]}); continuing")
            continue
        _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: finished in {time.time() - t0:.0f} s")
        if exporter and is_main_process():
            exporter.export(r)
    return failed


def _pending(recipe_arg: str, runs: list[SweepRun], stages, exporter) -> list[tuple[SweepRun, str]]:
    """The runs still to do, each with why; an exported or finished run is skipped (a finished one exported)."""
    todo = []
    for r in runs:
        if exporter and exporter.is_exported(r):
            _say(f"{r.point} seed {r.seed}: exported, skipped")
            continue
        state, why = run_state(load_recipe(recipe_arg, r.overrides), Path(r.dir), stages)
        if state == "done":
            _say(f"{r.point} seed {r.seed}: done, skipped")
            if exporter:
                exporter.export(r)
        else:
            todo.append((r, why))
    return todo


def _child_env(n: int, n_todo: int) -> dict[str, str]:
    """The subprocesses' environment: this one, the cores split between the `n` runs at a time (unless
    OMP_NUM_THREADS is set), and this checkout of `pipeline` first on PYTHONPATH."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # n processes share the cores instead of each grabbing all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, min(n, n_todo or 1))))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")] if p
    )
    return env


def _run_command(recipe_arg: str, r: SweepRun, stages) -> list[str]:
    """`python -m pipeline.run` of one run: its recipe, directory, stages and overrides."""
    cmd = [sys.executable, "-m", "pipeline.run", "--recipe", recipe_arg, "--output-dir", r.dir]
    if stages:
        cmd += ["--stages", stages if isinstance(stages, str) else ",".join(stages)]
    return cmd + list(r.overrides)


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # each child records its stage as failed and exits 130; a rerun resumes it
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)


def run_parallel(recipe_arg: str, runs: list[SweepRun], stages, n: int, exporter=None) -> dict[str, str]:
    """Run up to `n` runs at a time as `python -m pipeline.run` subprocesses (one process each)."""
    todo = _pending(recipe_arg, runs, stages, exporter)
    env = _child_env(n, len(todo))
    failed: dict[str, str] = {}
    procs: list[subprocess.Popen] = []
    stopping = []

    def one(item):
        r, why = item
        if stopping:
            return
        Path(r.dir).mkdir(parents=True, exist_ok=True)
        cmd = _run_command(recipe_arg, r, stages)
        _say(f"{r.point} seed {r.seed}: running ({why}); log: {r.dir}/sweep.log")
        t0 = time.time()
        with open(Path(r.dir) / "sweep.log", "a") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            rc = p.wait()
        if stopping:
            return
        if rc != 0:
            failed[r.dir] = f"exit code {rc} (see {r.dir}/sweep.log)"
            _say(f"{r.point} seed {r.seed}: FAILED, {failed[r.dir]}")
        else:
            _say(f"{r.point} seed {r.seed}: finished in {time.time() - t0:.0f} s")
            if exporter:
                exporter.export(r)

    pool = ThreadPoolExecutor(max_workers=n)
    try:
        for future in [pool.submit(one, item) for item in todo]:
            future.result()
    except BaseException:
        stopping.append(True)  # queued runs do not start; running ones are told to stop
        _terminate(procs)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed
