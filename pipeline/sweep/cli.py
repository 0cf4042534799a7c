"""The command line of `python -m pipeline.sweep` (`build_parser`, `main`): run a recipe over seeds x a grid of
settings, then aggregate with intervals; or only re-aggregate (`--aggregate D`).

Imports: pipeline.config, pipeline.run (inside `_sweep`, to check --stages), pipeline.logs, the leaves and every
module of pipeline.sweep.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline.config import load_recipe
from pipeline.dist import is_main_process, world_size
from pipeline.errors import RecipeError, redact_credentials
from pipeline.io import atomic_write_json
from pipeline.sweep.aggregation import aggregate, resummarize
from pipeline.sweep.export import Exporter
from pipeline.sweep.grid import SWEEP_FILE, build_runs, grid_points, parse_grid, parse_seeds
from pipeline.sweep.runner import _say, run_parallel, run_sequential, run_state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description="Run a recipe over seeds x a grid (each run a pipeline.run directory D/<point>/seed-<s>/), "
        "skipping finished runs, then aggregate means and 95% t-intervals into D/summary.{json,md}.",
    )
    p.add_argument("--recipe", default="tiny-cpu", help="preset name or path to a YAML recipe (default: tiny-cpu)")
    p.add_argument("--seeds", default="0,1,2", help="seeds, e.g. 0,1,2 or 0-4 (default: 0,1,2)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a grid axis: recipe key and its values (YAML; lists in brackets); repeatable, the grid is "
        "the product of the axes",
    )
    p.add_argument("--stages", default=None, help="comma-separated stages for every run (default: the recipe's)")
    p.add_argument("--output-dir", default=None, help="sweep directory D (required unless --aggregate)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time, as subprocesses (default 1: sequential, in-process)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done, run nothing")
    p.add_argument(
        "--aggregate",
        default=None,
        metavar="D",
        help="only re-aggregate the sweep in D: a sweep directory or a results folder written by --export",
    )
    p.add_argument(
        "--from-summary",
        action="store_true",
        help="with --aggregate D: recompute D/summary.{json,md} and the plots from D/summary.json's per-seed "
        "values alone (no run directories), e.g. for a committed summary",
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="E",
        help="copy each finished run's small results (metrics, comparisons, temperatures, train logs, manifest, "
        "resolved recipe; no weights or checkpoints) to E/<point>/seed-<s>/ and aggregate into E; runs already "
        "exported there with the same settings are skipped (so a new machine reruns only the unfinished ones)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied to every run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from pipeline.logs import quiet_library_noise

    quiet_library_noise()  # the in-process runs skip pipeline.run.main, which does this for a single run
    try:
        if args.aggregate:
            return _aggregate_only(args)
        return _sweep(args)
    except RecipeError as e:
        print(f"error: {redact_credentials(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}); run the same command again to resume the sweep", file=sys.stderr)
        return 130


def _aggregate_only(args) -> int:
    """--aggregate D [--from-summary]: rebuild D's summary, run nothing."""
    if is_main_process():
        (resummarize if args.from_summary else aggregate)(args.aggregate)
        _say(f"wrote {Path(args.aggregate) / 'summary.md'} and summary.json")
    return 0


def _check_args(args) -> None:
    if not args.output_dir:
        raise RecipeError("--output-dir D is required (or --aggregate D to re-aggregate an existing sweep)")
    if args.parallel < 1:
        raise RecipeError(f"--parallel must be >= 1, got {args.parallel}")
    if args.parallel > 1 and world_size() > 1:
        raise RecipeError(
            "--parallel N runs subprocesses and cannot be combined with accelerate launch/"
            "torchrun (there every run already uses all processes); drop --parallel"
        )


def _dry_run(args, runs: list, exporter: Exporter | None) -> None:
    """--dry-run: each run, whether it is done (or exported) and its overrides."""
    for r in runs:
        state, why = run_state(load_recipe(args.recipe, r.overrides), Path(r.dir), args.stages)
        if exporter and exporter.is_exported(r):
            state, why = "done", f"exported to {exporter.dest(r)}"
        print(f"{state:5s} {r.point} seed-{r.seed}  {r.dir}  ({why})")
        print(f"      overrides: {' '.join(redact_credentials(r.overrides))}")


def _sweep(args) -> int:
    """Define the sweep, run what is not done, aggregate; 1 when a run failed."""
    _check_args(args)
    out = Path(args.output_dir).resolve()
    seeds = parse_seeds(args.seeds)
    grid = parse_grid(args.grid)
    points = grid_points(grid)
    if args.stages:
        from pipeline.run import select_stages

        select_stages(args.stages)  # validate once, with pipeline.run's message
    runs = build_runs(args.recipe, args.overrides, points, seeds, out)
    definition = {
        "recipe": args.recipe,
        "seeds": seeds,
        "grid": [[k, v] for k, v in grid],
        "stages": args.stages,
        "overrides": list(args.overrides),
        "points": points,
        "runs": [asdict(r) for r in runs],
    }
    exporter = None
    if args.export:
        exporter = Exporter(Path(args.export).resolve(), args.recipe, args.stages, out, definition)
    count = f"{len(runs)} runs ({len(points)} point(s) x {len(seeds)} seed(s))"
    if args.dry_run:
        if is_main_process():
            _dry_run(args, runs, exporter)
            print(count)
        return 0
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SWEEP_FILE, definition)
        if exporter:
            exporter.write_definition()
    _say(f"{count} in {out}")
    if args.parallel > 1:
        failed = run_parallel(args.recipe, runs, args.stages, args.parallel, exporter)
    else:
        failed = run_sequential(args.recipe, runs, args.stages, exporter)
    if is_main_process():
        final = exporter.root if exporter else out  # the export holds every finished run, on any machine
        aggregate(final)
        _say(f"wrote {final / 'summary.md'} and summary.json")
    if failed:
        _say(f"{len(failed)} run(s) failed; rerun the same command to retry them:")
        for d, why in failed.items():
            _say(f"  {d}: {why}")
        return 1
    return 0
