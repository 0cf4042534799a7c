"""`python -m pipeline.sweep`: run a recipe over seeds x a grid of settings, then aggregate with intervals.

    python -m pipeline.sweep --recipe tiny-cpu --seeds 0,1,2 --stages reward,calibration \\
        --grid data.synthetic.drift_scale=0,0.5,1,2 --output-dir runs/sweep-drift
    python -m pipeline.sweep --recipe tiny-cpu --seeds 0-4 --dry-run --output-dir runs/sweep-drift
    python -m pipeline.sweep --aggregate runs/sweep-drift          # re-aggregate, run nothing
    python -m pipeline.sweep ... --export results/drift            # also keep each finished run's results
    python -m pipeline.sweep --aggregate results/drift             # aggregate from that folder alone
    accelerate launch --num_processes 2 -m pipeline.sweep ...        # each run uses both processes

Every (grid point x seed) is one ordinary `pipeline.run` run directory, D/<point>/seed-<s>/, built from the
recipe, the command-line overrides, the grid point's values and the seed, in that order. The seed is
written into EVERY seed field of the resolved recipe (`seed_overrides`: the top-level seed, data.seed,
data.synthetic.seed, and any other `seed`/`*_seed` key that is set, e.g. calibration.seed,
align.ppo.seed, reward.train.data_seed), so seed s is one independent replicate of the whole run. A
point's name is readable: `drift_scale=0.5` (several axes joined by `__`; `default` without a grid).

Runs go through `pipeline.run.run_pipeline`, so its manifest decides what is done: a finished run is
skipped, an interrupted one (Ctrl-C, kill, a failure) resumes from its stage checkpoints when the same
sweep command is run again. Runs are sequential by default (in-process; under `accelerate launch` or
`torchrun` every process joins every run). `--parallel N` runs N at a time as `python -m pipeline.run`
subprocesses (one process each, torch threads split between them; logs in each run's sweep.log).
A run that fails is reported and the sweep goes on with the others (exit code 1 at the end).

Aggregation (after the runs, or alone with `--aggregate D`) reads every finished run's
calibration/metrics.json, calibration/temperatures.json and, when the align stage ran, align/metrics.json
and align/judgements.json, and writes:

* D/summary.json: for each grid point, RM (or aligned policy, or judged comparison), scope (a source,
  hh_average, all_average) and metric: mean, sd, n seeds and a 95% t-interval over seeds (`t_interval`);
  and the seed-paired differences MORE - MultiTask, MORE - Uniform and Uniform - MultiTask (for aligned
  policies: per method) with their 95% t-intervals, the paired t-test's p-value (`t_test_p`) and a
  sentence (`difference_sentence`). The rule is the project's one (`pipeline.stats.is_significant`): significant
  only when the interval excludes zero AND p < 0.05 strictly. Intervals of a metric's mean are clipped to
  its range (`bounded_interval`: accuracy in [0, 1], ECE >= 0, T >= 0; the t-interval's own ends are kept
  as t_low / t_high); differences are not clipped.
* D/summary.md: the same as readable tables (headline metrics, each with its better direction; accuracy in
  %, as in report.md; a warning where fewer than 3 seeds made the intervals; every source in
  summary.json), ending with a paragraph that names every significant difference (`summary_paragraph`).
* D/plot_<axis>.png: per grid axis, headline metrics (all-source average) vs the axis value, one line per
  RM with its 95% interval band (one figure per combination of the other axes' values); without a grid,
  D/plot_seeds.png (per-seed values, mean and interval per RM).

With `--export E`, each run's small results are copied to E/<point>/seed-<s>/ as soon as it finishes
(`export_run`: EXPORT_GLOBS, no weights or checkpoints, machine paths made relative) with E/.../export.json
(overrides + `run_fingerprint`), and the summary is written into E. A run exported with the same
fingerprint is skipped, so on a new machine only unfinished runs run; `--aggregate E` works from E alone and
counts an export only when its run fingerprint is the one E/sweep.json records (and its recipe.yaml, seeds
aside, agrees with its point's other runs); summary.md names every run and per-seed value left out, and why.

The statistics are small pure functions (`t_interval`, `t_test_p`, `paired_differences` in pipeline.stats;
`bounded_interval`, `difference_sentence`), tested against scipy and hand-computed values. D/sweep.json
records the sweep's definition so that `--aggregate D` knows the points, seeds and axes.

Modules, bottom up (each imports only those before it): `grid` (seeds, grid, point names, per-run overrides,
the definition), `runner` (running the runs), `export` (--export), `metrics` (labels, ranges, the verdict and
sentence of a difference), `summary` (summary.md), `plots`, `aggregation` (collecting the runs' numbers,
`aggregate`, writing summary.json, summary.md and the plots), `cli` (`main`); `python -m pipeline.sweep` runs
`__main__`. This `__init__` imports only those modules and re-exports the public names that scripts and
tests use.
"""

from pipeline.sweep.aggregation import (
    aggregate,
    aggregate_point,
    align_values,
    calibration_values,
    collect_run,
    resummarize,
)
from pipeline.sweep.cli import build_parser, main
from pipeline.sweep.export import EXPORT_FILE, EXPORT_GLOBS, Exporter, export_run, run_fingerprint, strip_paths
from pipeline.sweep.grid import (
    SWEEP_FILE,
    SweepRun,
    build_runs,
    grid_points,
    parse_grid,
    parse_seeds,
    seed_fields,
    seed_overrides,
)
from pipeline.sweep.metrics import (
    MIN_SEEDS,
    PAIRS,
    PERCENT_METRICS,
    bounded_interval,
    difference_sentence,
    is_significant,
    judge,
    metric_label,
    metric_range,
)
from pipeline.sweep.plots import band_arrays, seed_bar, write_plots
from pipeline.sweep.runner import run_parallel, run_sequential, run_state
from pipeline.sweep.summary import VERDICTS, cell, render_summary, seed_warning, summary_paragraph


__all__ = [
    "EXPORT_FILE",
    "EXPORT_GLOBS",
    "MIN_SEEDS",
    "PAIRS",
    "PERCENT_METRICS",
    "SWEEP_FILE",
    "VERDICTS",
    "Exporter",
    "SweepRun",
    "aggregate",
    "aggregate_point",
    "align_values",
    "band_arrays",
    "bounded_interval",
    "build_parser",
    "build_runs",
    "calibration_values",
    "cell",
    "collect_run",
    "difference_sentence",
    "export_run",
    "grid_points",
    "is_significant",
    "judge",
    "main",
    "metric_label",
    "metric_range",
    "parse_grid",
    "parse_seeds",
    "render_summary",
    "resummarize",
    "run_fingerprint",
    "run_parallel",
    "run_sequential",
    "run_state",
    "seed_bar",
    "seed_fields",
    "seed_overrides",
    "seed_warning",
    "strip_paths",
    "summary_paragraph",
    "write_plots",
]
