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
  sentence (`difference_sentence`). The rule is the project's one (`compare.is_significant`): significant
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
fingerprint is skipped, so on a new machine only unfinished runs run; `--aggregate E` works from E alone.

The statistics are small pure functions (`t_interval`, `t_test_p`, `paired_differences`,
`bounded_interval`, `difference_sentence`), tested against scipy and hand-computed values. D/sweep.json
records the sweep's definition so that `--aggregate D` knows the points, seeds and axes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.calibration.compare import (
    ALPHA,
    DIRECTION_TEXT,
    direction,
    p_text,
    significance_paragraph,
)
from pipeline.calibration.compare import is_significant as significance_rule
from pipeline.config import RecipeError, load_recipe, recipe_to_dict, yaml_load
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_json


SWEEP_FILE = "sweep.json"
EXPORT_FILE = "export.json"
# A run's small results, copied by --export (globs relative to the run directory): no weights, checkpoints,
# scores or data. Train logs carry MORE's source weights (more/lambda/<source>).
EXPORT_GLOBS = (
    "manifest.json",
    "recipe.yaml",
    "report.md",
    "calibration/metrics.json",
    "calibration/comparisons.json",
    "calibration/comparisons.md",
    "calibration/temperatures.json",
    "calibration/config.json",
    "calibration/table.md",
    "align/metrics.json",
    "align/judgements.json",
    "reward/index.json",
    "reward/*/train_log.json",
    "reward/*/temperature.json",
)
CONFIDENCE = 0.95
# Seed-paired differences reported for every grid point: (a, b) means a - b.
PAIRS = (("more", "multitask"), ("more", "uniform"), ("uniform", "multitask"))
RM_LABELS = {"more": "MORE", "multitask": "MultiTask", "uniform": "Uniform"}
# Fewer seeds than this: the t-interval (t = 12.7 for 2 seeds) is reported with a warning.
MIN_SEEDS = 3
# Shown in percent / percentage points in every table and plot (summary.json keeps fractions, as metrics.json).
PERCENT_METRICS = ("accuracy", "win_rate", "lose_rate", "win_minus_lose")


# ---------------------------------------------------------------------------------------------------
# Statistics: pure functions


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """Mean, sample sd (ddof=1), n and the two-sided t-interval of the mean over `values` (None skipped).

    With n < 2 there is no sd and no interval (their fields are None); with sd = 0 the interval is the mean.
    """
    from scipy.stats import t as student_t

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out = {"mean": None, "sd": None, "n": n, "low": None, "high": None, "confidence": confidence}
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, low=mean - half, high=mean + half)
    return out


def paired_differences(a: dict, b: dict) -> dict:
    """{seed: a[seed] - b[seed]} over the seeds where both have a value (the pairing removes seed noise
    shared by both RMs, e.g. the data draw)."""
    return {s: a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None}


def t_test_p(mean: float | None, sd: float | None, n: int) -> float | None:
    """Two-sided p-value of the one-sample t-test of mean = 0 (the test the t-interval inverts); None when
    n < 2. With sd = 0: 0 for a non-zero mean, 1 for a zero mean."""
    from scipy.stats import t as student_t

    if mean is None or sd is None or n < 2:
        return None
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2.0 * student_t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def is_significant(stats: dict) -> bool | None:
    """The project's rule (compare.is_significant) on a seed-paired difference: the t-interval excludes 0
    AND p < 0.05 strictly; None without an interval. p comes from the row, or from its mean, sd and n
    (summaries written before p-values were stored)."""
    p = stats.get("p_value")
    if p is None:
        p = t_test_p(stats.get("mean"), stats.get("sd"), stats.get("n", 0))
    return significance_rule(stats.get("low"), stats.get("high"), p)


# The range of each metric's values: (low, high), None = unbounded on that side.
_UNIT = (0.0, 1.0)
METRIC_RANGES = {
    "accuracy": _UNIT,
    "brier": _UNIT,
    "truth_mae": _UNIT,
    "gold_mae": _UNIT,
    "win_rate": _UNIT,
    "lose_rate": _UNIT,
    "win_minus_lose": (-1.0, 1.0),
    "nll": (0.0, None),
    "temperature": (0.0, None),
    "perplexity": (1.0, None),
}


def metric_range(metric: str) -> tuple[float | None, float | None]:
    """The values a metric can take; ECEs lie in [0, 1]; unknown metrics (gold reward) are unbounded."""
    base = metric[3:] if metric.startswith("ts_") else metric
    if re.fullmatch(r"(truth_)?ece_\d+", base):
        return _UNIT
    return METRIC_RANGES.get(base, (None, None))


def bounded_interval(stats: dict, metric: str) -> dict:
    """`stats` with its interval clipped to the metric's range (accuracy in [0, 1], ECE >= 0, T >= 0, ...).

    The t-interval of a mean is symmetric and ignores the range, so with few seeds it can reach impossible
    values (accuracy above 1, a negative ECE). We keep the t-interval (so it matches scipy and the seed-paired
    differences, which are not clipped) and clip its ends to the range: the clipped interval holds exactly
    the possible values of the t-interval. `clipped` names the ends that were moved; `t_low`/`t_high` keep
    the unclipped ends."""
    out = dict(stats)
    lo, hi = metric_range(metric)
    clipped = []
    if out.get("low") is not None and lo is not None and out["low"] < lo:
        out["t_low"], out["low"] = out["low"], lo
        clipped.append("low")
    if out.get("high") is not None and hi is not None and out["high"] > hi:
        out["t_high"], out["high"] = out["high"], hi
        clipped.append("high")
    if clipped:
        out["clipped"] = clipped
    return out


def judge(d: dict) -> tuple[str, str | None] | None:
    """A significant difference row's (side, judgement): side 'lower'/'higher' (a vs b), judgement 'better',
    'worse' (for a) or None where the metric has no direction or, for a temperature (closer to 1 is better),
    the two means are unknown or lie on opposite sides of 1. None when not significant (`is_significant`)."""
    if not is_significant(d):
        return None
    side = "lower" if d["mean"] < 0 else "higher"
    better = d.get("better", direction(d.get("metric", "")))
    if better in ("lower", "higher"):
        return side, "better" if side == better else "worse"
    ma, mb = d.get("a_mean"), d.get("b_mean")
    if better == "closer to 1" and ma is not None and mb is not None and (ma - 1) * (mb - 1) >= 0:
        return side, "better" if abs(ma - 1) < abs(mb - 1) else "worse"
    return side, None


def difference_sentence(
    a: str, b: str, what: str, stats: dict, better: str | None, *, scale: float = 1.0, unit: str = ""
) -> str:
    """One sentence about the seed-paired difference a - b, following the rule (`is_significant`): otherwise
    "no significant difference"; if significant, say which is lower/higher and which is better. For
    `better` = 'closer to 1' (a temperature) the verdict needs the two means (`a_mean`, `b_mean` in stats)
    on the same side of 1. `scale`, `unit`: accuracy is written in percentage points (scale 100)."""
    n = stats.get("n", 0)
    digits = 2 if scale == 100 else 4

    def v(x):
        return f"{x * scale:+.{digits}f}{unit}"

    if stats.get("mean") is None:
        return f"{what}: {a} - {b} not available (no seed has both)."
    sig = is_significant(stats)
    if sig is None:
        return f"{what}: {a} - {b} = {v(stats['mean'])} from {n} paired seed(s); too few seeds for an interval."
    p = stats.get("p_value", t_test_p(stats["mean"], stats.get("sd"), n))
    ci = (
        f"{a} - {b} = {v(stats['mean'])}, {100 * stats['confidence']:.0f}% CI "
        f"[{v(stats['low'])}, {v(stats['high'])}], {p_text(p)}, {n} paired seeds"
    )
    if n < MIN_SEEDS:
        ci += f"; fewer than {MIN_SEEDS} seeds, a very wide interval"
    if not sig:
        return f"{what}: no significant difference between {a} and {b} ({ci})."
    side = "lower" if stats["mean"] < 0 else "higher"
    if better == "closer to 1":
        ma, mb = stats.get("a_mean"), stats.get("b_mean")
        if ma is None or mb is None or (ma - 1) * (mb - 1) < 0:
            return f"{what}: {a} is {side} than {b} ({ci}); the two lie on opposite sides of 1."
        verdict = "better" if abs(ma - 1) < abs(mb - 1) else "worse"
        return f"{what}: {a} is {verdict} than {b} ({side}, closer to 1 is better; {ci})."
    if better is None:
        return f"{what}: {a} is {side} than {b} ({ci})."
    verdict = "better" if side == better else "worse"
    return f"{what}: {a} is {verdict} than {b} ({side}; {ci})."


# ---------------------------------------------------------------------------------------------------
# Sweep definition: seeds, grid, points, per-run overrides


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' (inclusive) or a mix ('0-2,7') -> sorted distinct seeds."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError
                seeds += list(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise RecipeError(f"--seeds {text!r}: {part!r} is not a seed or a range like 0-4") from None
    if not seeds:
        raise RecipeError(f"--seeds {text!r}: no seed given (e.g. --seeds 0,1,2)")
    return sorted(set(seeds))


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces and quotes: 'a,[b,c],d' -> ['a', '[b,c]', 'd']."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """['key=v1,v2', ...] -> [(key, ['v1', 'v2']), ...]; each value stays YAML text (parsed as an override)."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--grid {item!r} is not of the form key.sub=v1,v2,...")
        key, values = item.split("=", 1)
        key = key.strip()
        vals = [v for v in split_top_level(values) if v != ""]
        if not key or not vals:
            raise RecipeError(f"--grid {item!r}: needs a key and at least one value")
        if any(k == key for k, _ in grid):
            raise RecipeError(f"--grid: key {key!r} given twice; list all its values in one --grid")
        if len(set(vals)) != len(vals):
            raise RecipeError(f"--grid {item!r}: a value is repeated")
        if key.split(".")[-1] == "seed" or key.split(".")[-1].endswith("_seed"):
            raise RecipeError(f"--grid {key}: seeds are set by --seeds (into every seed field), not by the grid")
        grid.append((key, vals))
    return grid


def axis_labels(keys: list[str]) -> dict[str, str]:
    """Short label per grid key: its last segment, or the whole dotted key where last segments clash."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(text: str) -> str:
    """A readable directory-name piece: 'methods=[more, uniform]' -> 'methods=more+uniform'."""
    text = re.sub(r"[\[\]{}()'\" ]", "", text).replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def grid_points(grid: list[tuple[str, list[str]]]) -> list[dict]:
    """Every combination of the grid's values, in order: [{"name", "values": {key: text}}]."""
    if not grid:
        return [{"name": "default", "values": {}}]
    keys = [k for k, _ in grid]
    labels = axis_labels(keys)
    points = []
    for combo in itertools.product(*(vals for _, vals in grid)):
        name = "__".join(_safe(f"{labels[k]}={v}") for k, v in zip(keys, combo))
        points.append({"name": name, "values": dict(zip(keys, combo))})
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise RecipeError(
            f"--grid values give clashing directory names {names}; use values that differ in letters or digits"
        )
    return points


def seed_fields(plain: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every seed field that is set (not null) in a resolved recipe (`recipe_to_dict`):
    keys named `seed` or ending in `_seed`, at any depth (lists are indexed by number)."""
    paths = []
    items = plain.items() if isinstance(plain, dict) else enumerate(plain) if isinstance(plain, list) else []
    for k, v in items:
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            paths += seed_fields(v, path)
        elif isinstance(k, str) and (k == "seed" or k.endswith("_seed")) and v is not None and not isinstance(v, bool):
            paths.append(path)
    return paths


def seed_overrides(recipe, seed: int) -> list[str]:
    """Overrides that put `seed` in every seed field of `recipe`. The top-level seed drives model init,
    training order, mixing and alignment; data.seed the train/valid/test cut; data.synthetic.seed the
    synthetic benchmark's draw; a null calibration.seed already follows the top-level one."""
    return [f"{p}={int(seed)}" for p in seed_fields(recipe_to_dict(recipe))]


@dataclass
class SweepRun:
    point: str
    seed: int
    dir: str
    overrides: list[str] = field(default_factory=list)


def build_runs(
    recipe_arg: str, overrides: list[str], points: list[dict], seeds: list[int], out: Path
) -> list[SweepRun]:
    """Every (point x seed) with its full override list; loads each recipe once, so a bad key or value
    fails here, before anything runs."""
    runs = []
    for point in points:
        base = list(overrides) + [f"{k}={v}" for k, v in point["values"].items()]
        recipe = load_recipe(recipe_arg, base)
        for seed in seeds:
            full = base + seed_overrides(recipe, seed)
            load_recipe(recipe_arg, full)  # validate
            runs.append(SweepRun(point["name"], seed, str(out / point["name"] / f"seed-{seed}"), full))
    return runs


# ---------------------------------------------------------------------------------------------------
# Running


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


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(msg: str) -> None:
    if _is_main():
        print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def run_sequential(recipe_arg: str, runs: list[SweepRun], stages, exporter: Exporter | None = None) -> dict[str, str]:
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
            if exporter and _is_main():
                exporter.export(r)
            continue
        _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: running ({why}) -> {r.dir}")
        t0 = time.time()
        try:
            run_pipeline(recipe, r.dir, stages=stages)
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
            if _world() > 1:
                raise
            failed[r.dir] = f"{type(e).__name__}: {e}"[:300]
            _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: FAILED ({failed[r.dir]}); continuing")
            continue
        _say(f"({i}/{len(runs)}) {r.point} seed {r.seed}: finished in {time.time() - t0:.0f} s")
        if exporter and _is_main():
            exporter.export(r)
    return failed


def run_parallel(
    recipe_arg: str, runs: list[SweepRun], stages, n: int, exporter: Exporter | None = None
) -> dict[str, str]:
    """Run up to `n` runs at a time as `python -m pipeline.run` subprocesses (one process each)."""
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
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # n processes share the cores instead of each grabbing all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, min(n, len(todo) or 1))))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")] if p
    )
    failed: dict[str, str] = {}
    procs: list[subprocess.Popen] = []
    stopping = []

    def one(item):
        r, why = item
        if stopping:
            return
        Path(r.dir).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pipeline.run", "--recipe", recipe_arg, "--output-dir", r.dir]
        if stages:
            cmd += ["--stages", stages if isinstance(stages, str) else ",".join(stages)]
        _say(f"{r.point} seed {r.seed}: running ({why}); log: {r.dir}/sweep.log")
        t0 = time.time()
        with open(Path(r.dir) / "sweep.log", "a") as log:
            p = subprocess.Popen(cmd + list(r.overrides), stdout=log, stderr=subprocess.STDOUT, env=env)
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
        for p in procs:  # each child records its stage as failed and exits 130; a rerun resumes it
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed


# ---------------------------------------------------------------------------------------------------
# Exporting finished runs' small results (a results folder that outlives the machine)


def run_fingerprint(recipe_arg: str, overrides: list[str], stages, roots=()) -> str:
    """sha256 of what a run computes: its resolved recipe (with machine paths under `roots` made relative,
    see `strip_paths`) and the selected stages. An export is reused only when this is unchanged."""
    resolved = recipe_to_dict(load_recipe(recipe_arg, overrides))
    resolved = json.loads(strip_paths(json.dumps(resolved, sort_keys=True, default=str), roots))
    return sha256_json({"recipe": resolved, "stages": stages})


def strip_paths(text: str, roots) -> str:
    """`text` with every absolute path under one of `roots` written relative to it (longest root first):
    '<root>/x' -> 'x' for the run directory (the first root), '<name>/x' for the others (their `name`s are
    given as (path, name) pairs), so exported files name no directory of this machine."""
    pairs = sorted(((str(Path(r)), n) for r, n in roots), key=lambda rn: -len(rn[0]))
    for root, name in pairs:
        if root in ("", "/", "."):
            continue
        text = text.replace(root + "/", f"{name}/" if name else "").replace(root, name or ".")
    return text


def _machine_roots(out_dir: Path) -> list[tuple[str, str]]:
    """Directories of this machine that exported files name relatively: the sweep directory, the working
    directory, the home directory."""
    return [(str(Path(out_dir).resolve()), "<sweep>"), (str(Path.cwd()), "<cwd>"), (str(Path.home()), "~")]


def _export_roots(run_dir: Path, out_dir: Path) -> list[tuple[str, str]]:
    return [(str(Path(run_dir).resolve()), ""), (str(Path(run_dir)), "")] + _machine_roots(out_dir)


def _portable(obj, roots):
    """A JSON-able object with the machine paths under `roots` made relative (`strip_paths`)."""
    return json.loads(strip_paths(json.dumps(obj), roots))


def recipe_label(recipe_arg: str) -> str:
    """How an export names its recipe: a preset's name, or a recipe file's name (its content is in recipe.yaml
    and in the fingerprint; its directory is this machine's)."""
    return Path(recipe_arg).name if Path(recipe_arg).is_file() else recipe_arg


def export_run(run_dir: Path, dest: Path, info: dict, out_dir: Path) -> list[str]:
    """Copy a finished run's small results (`EXPORT_GLOBS`) to `dest`, absolute paths of this machine
    replaced (`strip_paths`), with DEST/export.json = `info` + the files; atomic (a temporary folder renamed).
    Returns the exported files, relative to `dest`."""
    run_dir = Path(run_dir)
    roots = _export_roots(run_dir, out_dir)
    files = sorted({str(f.relative_to(run_dir)) for g in EXPORT_GLOBS for f in run_dir.glob(g) if f.is_file()})
    with atomic_dir(dest) as tmp:
        for rel in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(strip_paths((run_dir / rel).read_text(encoding="utf-8"), roots), encoding="utf-8")
        atomic_write_json(tmp / EXPORT_FILE, _portable({**info, "files": files}, roots))
    return files


def exported(dest: Path, fingerprint: str) -> bool:
    """True when `dest` holds a complete export (export.json is written last) of a run with this fingerprint."""
    info = _read(Path(dest) / EXPORT_FILE)
    return isinstance(info, dict) and info.get("fingerprint") == fingerprint


def _export_info(recipe_arg: str, r: SweepRun, stages, fingerprint: str) -> dict:
    return {
        "recipe": recipe_label(recipe_arg),
        "point": r.point,
        "seed": r.seed,
        "overrides": list(r.overrides),
        "stages": stages,
        "fingerprint": fingerprint,
    }


class Exporter:
    """--export E: E/sweep.json (the definition, run directories relative) and E/<point>/seed-<s>/ per finished
    run. A run whose export exists with the same fingerprint is not run again, on this machine or another."""

    def __init__(self, root: Path, recipe_arg: str, stages, out_dir: Path, definition: dict):
        self.root, self.recipe_arg, self.stages, self.out_dir = Path(root), recipe_arg, stages, Path(out_dir)
        self.definition = definition
        self.fingerprints: dict = {}

    def dest(self, r: SweepRun) -> Path:
        return self.root / r.point / f"seed-{r.seed}"

    def fingerprint(self, r: SweepRun) -> str:
        key = (r.point, r.seed)
        if key not in self.fingerprints:
            self.fingerprints[key] = run_fingerprint(
                self.recipe_arg, r.overrides, self.stages, _machine_roots(self.out_dir)
            )
        return self.fingerprints[key]

    def write_definition(self) -> None:
        runs = [{**run, "dir": f"{run['point']}/seed-{run['seed']}"} for run in self.definition["runs"]]
        definition = {**self.definition, "recipe": recipe_label(self.recipe_arg), "runs": runs, "export": True}
        atomic_write_json(self.root / SWEEP_FILE, _portable(definition, _machine_roots(self.out_dir)))

    def is_exported(self, r: SweepRun) -> bool:
        return exported(self.dest(r), self.fingerprint(r))

    def export(self, r: SweepRun) -> None:
        files = export_run(
            Path(r.dir), self.dest(r), _export_info(self.recipe_arg, r, self.stages, self.fingerprint(r)), self.out_dir
        )
        _say(f"{r.point} seed {r.seed}: exported {len(files)} files to {self.dest(r)}")


# ---------------------------------------------------------------------------------------------------
# Collecting one run's numbers


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def calibration_values(metrics: dict, temperatures: dict | None, bins: int) -> list[tuple]:
    """[(section, rm, scope, metric, value)] from calibration/metrics.json (+ temperatures.json).

    Metrics: accuracy, ece_<bins>, brier, nll and, on synthetic data, truth_mae / truth_ece_<bins> (against
    the true preference probabilities) and gold_mae; each also after temperature scaling (prefix ts_)."""
    base = {
        "accuracy": ("accuracy",),
        f"ece_{bins}": (f"ece_{bins}",),
        "brier": ("brier",),
        "nll": ("nll",),
        "truth_mae": ("truth", "prob_mae"),
        f"truth_ece_{bins}": ("truth", f"ece_vs_truth_{bins}"),
        "gold_mae": ("truth_gold", "prob_mae"),
    }
    out = []
    for rm, per_scope in metrics.items():
        if not isinstance(per_scope, dict):
            continue
        for scope, m in per_scope.items():
            if not isinstance(m, dict):
                continue
            for name, keys in base.items():
                v = _get(m, *keys)
                if isinstance(v, (int, float)):
                    out.append(("calibration", rm, scope, name, float(v)))
                tv = _get(m, "temperature_scaled", *keys)
                if name != "accuracy" and isinstance(tv, (int, float)):
                    out.append(("calibration", rm, scope, f"ts_{name}", float(tv)))
        t = (temperatures or {}).get(rm)
        if isinstance(t, (int, float)):
            out.append(("calibration", rm, "all_average", "temperature", float(t)))
    return out


def align_values(metrics: dict | None, judgements: dict | None) -> list[tuple]:
    """[(section, name, scope, metric, value)] from align/metrics.json and align/judgements.json:
    gold reward (per prompt set and 'all') and perplexity (per source) of each policy `<rm>/<method>`;
    win/lose rates of each judged comparison `<method>: <a> vs <b>` per prompt set."""
    out = []
    for policy, m in (_get(metrics, "policies") or {}).items():
        for scope, g in (_get(m, "gold") or {}).items():
            if isinstance(_get(g, "mean"), (int, float)):
                out.append(("align", policy, scope, "gold_reward", float(g["mean"])))
        for scope, p in (_get(m, "perplexity") or {}).items():
            if isinstance(p, (int, float)):
                out.append(("align", policy, scope, "perplexity", float(p)))
    for label, per_set in (judgements or {}).items():
        for scope, e in (per_set or {}).items():
            w, lose = _get(e, "win"), _get(e, "lose")
            if isinstance(w, (int, float)) and isinstance(lose, (int, float)):
                out += [
                    ("judge", label, scope, "win_rate", float(w)),
                    ("judge", label, scope, "lose_rate", float(lose)),
                    ("judge", label, scope, "win_minus_lose", float(w) - float(lose)),
                ]
    return out


def collect_run(run_dir: Path, bins: int | None = None) -> list[tuple]:
    """Every headline value a finished run wrote (empty when it has none yet)."""
    run_dir = Path(run_dir)
    metrics = _read(run_dir / "calibration" / "metrics.json")
    out = []
    if isinstance(metrics, dict):
        cfg = _read(run_dir / "calibration" / "config.json") or {}
        b = bins or int(cfg.get("headline_bins") or 10)
        out += calibration_values(metrics, _read(run_dir / "calibration" / "temperatures.json"), b)
    out += align_values(_read(run_dir / "align" / "metrics.json"), _read(run_dir / "align" / "judgements.json"))
    return out


# ---------------------------------------------------------------------------------------------------
# Aggregation


def pair_names(a: str, b: str, names: list[str]) -> list[tuple[str, str]]:
    """The (name_a, name_b) to compare for RMs a and b: 'more' vs 'multitask' for calibration rows,
    'more/rjs' vs 'multitask/rjs' (same method) for aligned policies."""
    out = []
    for n in names:
        head, sep, tail = n.partition("/")
        if head == a and (f"{b}{sep}{tail}" in names):
            out.append((n, f"{b}{sep}{tail}"))
    return out


def aggregate_point(per_seed: dict[int, list[tuple]], confidence: float = CONFIDENCE) -> dict:
    """{"metrics": [...], "differences": [...]} for one grid point from {seed: collect_run(...)}."""
    table: dict[tuple, dict[int, float]] = {}
    for seed, rows in per_seed.items():
        for section, name, scope, metric, value in rows:
            table.setdefault((section, name, scope, metric), {})[seed] = value
    metrics = []
    for (section, name, scope, metric), vals in table.items():
        stats = bounded_interval(t_interval(list(vals.values()), confidence), metric)
        metrics.append(
            {
                "section": section,
                "rm": name,
                "scope": scope,
                "metric": metric,
                **stats,
                "values": {str(s): v for s, v in sorted(vals.items())},
            }
        )
    differences = []
    for section in ("calibration", "align"):
        names = sorted({k[1] for k in table if k[0] == section})
        for a, b in PAIRS:
            for na, nb in pair_names(a, b, names):
                keys = sorted({(k[2], k[3]) for k in table if k[0] == section and k[1] == na})
                for scope, metric in keys:
                    diffs = paired_differences(
                        table[(section, na, scope, metric)], table.get((section, nb, scope, metric), {})
                    )
                    if not diffs:
                        continue
                    stats = t_interval(list(diffs.values()), confidence)
                    stats["p_value"] = t_test_p(stats["mean"], stats["sd"], stats["n"])
                    va, vb = table[(section, na, scope, metric)], table[(section, nb, scope, metric)]
                    stats["a_mean"] = math.fsum(va[s] for s in diffs) / len(diffs)
                    stats["b_mean"] = math.fsum(vb[s] for s in diffs) / len(diffs)
                    what = f"{metric_label(metric)}, {scope}" + (f" ({na.partition('/')[2]})" if "/" in na else "")
                    differences.append(
                        {
                            "section": section,
                            "a": na,
                            "b": nb,
                            "scope": scope,
                            "metric": metric,
                            **stats,
                            "significant": is_significant(stats),
                            "better": direction(metric),
                            "values": {str(s): v for s, v in sorted(diffs.items())},
                            "sentence": difference_sentence(
                                rm_label(na), rm_label(nb), what, stats, direction(metric), **_units(metric)
                            ),
                        }
                    )
    return {"metrics": metrics, "differences": differences}


def _units(metric: str) -> dict:
    """difference_sentence's scale and unit: percentage points for accuracy and win/lose rates."""
    return {"scale": 100.0, "unit": " points"} if metric in PERCENT_METRICS else {}


def rm_label(name: str) -> str:
    head, sep, tail = name.partition("/")
    return RM_LABELS.get(head, head) + (f"/{tail}" if sep else "")


def metric_label(metric: str) -> str:
    ts = metric.startswith("ts_")
    base = metric[3:] if ts else metric
    m = re.fullmatch(r"(ece|truth_ece)_(\d+)", base)
    if m:
        base = f"ECE{m.group(2)}" if m.group(1) == "ece" else f"ECE{m.group(2)} vs true probabilities"
    else:
        base = {
            "accuracy": "accuracy",
            "brier": "Brier",
            "nll": "NLL",
            "truth_mae": "MAE vs true prob.",
            "gold_mae": "MAE vs gold prob.",
            "temperature": "temperature T",
            "gold_reward": "gold reward",
            "perplexity": "perplexity",
            "win_rate": "win rate",
            "lose_rate": "lose rate",
            "win_minus_lose": "win - lose",
        }.get(base, base)
    return f"{base} after temperature scaling" if ts else base


def export_mismatch(info, sweep: dict, run: dict) -> str:
    """Why an exported run does not belong to the sweep's definition ('' when it does): the recipe, the
    stages and the run's overrides (grid values and seed included) must be the ones recorded at export."""
    if not isinstance(info, dict):
        return "no export.json: the run has not finished"
    for key, want in (
        ("recipe", sweep.get("recipe")),
        ("stages", sweep.get("stages")),
        ("overrides", run["overrides"]),
    ):
        if info.get(key) != want:
            return f"its {key} differ from the sweep's definition"
    return ""


def aggregate(out_dir: str | os.PathLike, confidence: float = CONFIDENCE, verify: bool = True) -> dict:
    """Read D/sweep.json and every run's results; write D/summary.json, D/summary.md and the plots.

    With `verify` (the default) a run counts only when its manifest shows every selected stage up to date
    for the sweep's current definition (recipe + overrides + grid values + seed), so results of a run whose
    settings have changed since, or that has not finished, are never aggregated."""
    out_dir = Path(out_dir)
    sweep = _read(out_dir / SWEEP_FILE)
    if not isinstance(sweep, dict):
        raise RecipeError(
            f"{out_dir / SWEEP_FILE} not found or unreadable: {out_dir} is not a sweep directory "
            "(run python -m pipeline.sweep ... --output-dir there first)"
        )
    defined = {(r["point"], int(r["seed"])): r for r in sweep.get("runs", [])}
    from_export = bool(sweep.get("export"))
    summary = {"sweep": sweep, "confidence": confidence, "points": {}}
    for point in sweep["points"]:
        per_seed, runs = {}, {}
        for seed in sweep["seeds"]:
            run_dir = out_dir / point["name"] / f"seed-{seed}"
            if verify:
                run = defined.get((point["name"], int(seed)))
                if run is None:
                    runs[str(seed)] = "not in the sweep definition"
                    continue
                if from_export:  # a results folder: its export.json must be of this run's definition
                    why = export_mismatch(_read(run_dir / EXPORT_FILE), sweep, run)
                    if why:
                        runs[str(seed)] = f"not exported ({why})"
                        continue
                    rows = collect_run(run_dir)
                    runs[str(seed)] = "collected" if rows else "no results"
                    if rows:
                        per_seed[seed] = rows
                    continue
                state, why = run_state(load_recipe(sweep["recipe"], run["overrides"]), run_dir, sweep.get("stages"))
                if state != "done":
                    runs[str(seed)] = f"not done ({why})"
                    continue
            rows = collect_run(run_dir)
            runs[str(seed)] = "collected" if rows else "no results"
            if rows:
                per_seed[seed] = rows
        summary["points"][point["name"]] = {
            "grid": point["values"],
            "runs": runs,
            "n_runs": len(per_seed),
            **aggregate_point(per_seed, confidence),
        }
    atomic_write_json(out_dir / "summary.json", summary)
    plots = write_plots(out_dir, summary)
    atomic_write_text(out_dir / "summary.md", render_summary(summary, plots))
    return summary


def resummarize(out_dir: str | os.PathLike) -> dict:
    """Rebuild D/summary.json, D/summary.md and the plots from D/summary.json alone: every point's statistics
    are recomputed from the per-seed values its metric rows keep (the same numbers `aggregate` collected), so
    a committed summary follows the current rules and presentation without its run directories."""
    out_dir = Path(out_dir)
    summary = _read(out_dir / "summary.json")
    if not isinstance(summary, dict) or "points" not in summary:
        raise RecipeError(f"{out_dir / 'summary.json'} not found or not a sweep summary")
    for p in summary["points"].values():
        per_seed: dict[int, list[tuple]] = {}
        for r in p["metrics"]:
            for seed, v in r.get("values", {}).items():
                per_seed.setdefault(int(seed), []).append((r["section"], r["rm"], r["scope"], r["metric"], v))
        p.update(aggregate_point(per_seed, summary["confidence"]))
    atomic_write_json(out_dir / "summary.json", summary)
    plots = write_plots(out_dir, summary)
    atomic_write_text(out_dir / "summary.md", render_summary(summary, plots))
    return summary


# ---------------------------------------------------------------------------------------------------
# Rendering


VERDICTS = {True: "significant", False: "no significant difference", None: "too few seeds"}


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cell(stats: dict | None, metric: str = "") -> str:
    """'0.0512 [0.0401, 0.0623]' (mean and interval); '0.0512 (n=1)' without an interval. Accuracy and
    win/lose rates in percent (`PERCENT_METRICS`); an interval clipped to the metric's range is marked
    with a dagger, one from fewer than MIN_SEEDS seeds with (n=2)."""
    if not stats or stats.get("mean") is None:
        return "-"
    scale, digits = (100.0, 2) if metric in PERCENT_METRICS else (1.0, 4)

    def f(x):
        return _fmt(x * scale, digits)

    if stats.get("low") is None:
        return f"{f(stats['mean'])} (n={stats['n']})"
    mark = " †" if stats.get("clipped") else ""
    few = f" (n={stats['n']})" if stats.get("n", 0) < MIN_SEEDS else ""
    return f"{f(stats['mean'])} [{f(stats['low'])}, {f(stats['high'])}]{mark}{few}"


def seed_warning(n: int) -> str:
    """The warning printed beside intervals from fewer than MIN_SEEDS seeds (empty otherwise)."""
    if n >= MIN_SEEDS or n < 2:
        return ""
    from scipy.stats import t as student_t

    t = float(student_t.ppf(0.975, n - 1))
    return (
        f"Warning: {n} seeds. A 95% t-interval from {n} seeds uses t = {t:.1f} and is very wide (intervals of "
        f"bounded metrics are clipped to their range, marked †); run at least {MIN_SEEDS} seeds before "
        "reading anything into these intervals."
    )


def _index(rows: list[dict]) -> dict:
    return {(r["section"], r.get("rm", r.get("a")), r["scope"], r["metric"]): r for r in rows}


def headline_metrics(metrics: list[dict]) -> list[str]:
    present = {r["metric"] for r in metrics if r["section"] == "calibration"}
    ece = sorted(m for m in present if re.fullmatch(r"ece_\d+", m))
    order = [
        "accuracy",
        *ece[:1],
        *[f"ts_{m}" for m in ece[:1]],
        "temperature",
        "brier",
        "nll",
        "truth_mae",
        "ts_truth_mae",
    ]
    return [m for m in order if m in present]


def key_metrics(heads: list[str]) -> list[str]:
    """The metrics compared in the markdown's difference tables and sentences (all are in summary.json)."""
    return [m for m in heads if m in ("accuracy", "temperature", "truth_mae") or re.fullmatch(r"(ts_)?ece_\d+", m)]


def _rms(metrics: list[dict], section: str) -> list[str]:
    names = sorted({r["rm"] for r in metrics if r["section"] == section})
    known = [n for n in ("more", "multitask", "uniform") if n in names]
    return known + [n for n in names if n not in known]


def render_summary(summary: dict, plots: list[str] | None = None) -> str:
    sweep = summary["sweep"]
    conf = f"{100 * summary['confidence']:.0f}%"
    lines = [
        "# Sweep summary",
        "",
        f"Recipe `{sweep['recipe']}`, seeds {', '.join(map(str, sweep['seeds']))}, stages "
        f"{sweep.get('stages') or 'the recipe default'}; overrides: "
        f"{' '.join(f'`{o}`' for o in sweep.get('overrides', [])) or 'none'}.",
        "Grid: " + ("; ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in sweep.get("grid", [])) or "none") + ".",
        "",
        f"Cells are `mean [{conf} t-interval over seeds]`; an interval that reached outside the metric's "
        "range (accuracy above 100%, a negative ECE or temperature) is clipped to the range and marked †. "
        "Accuracy and win/lose rates are in % (their differences in percentage points), as in report.md. "
        "Differences are seed-paired (the same seed's runs share their data draw), with the two-sided p-value "
        f"of the paired t-test. Rule: a difference is significant only when its {conf} interval excludes zero "
        f'AND p < {ALPHA:g}; otherwise it is "no significant difference". The *better* row says which '
        "direction is better. Every source and metric is in summary.json (fractions, as in metrics.json); the "
        "closing paragraph names every significant difference found there.",
        "",
    ]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    if len(summary["points"]) > 1:
        lines += overview(summary)
    for name, p in summary["points"].items():
        lines += [f"## {name}", ""]
        if p["grid"]:
            lines += ["Grid values: " + ", ".join(f"`{k}={v}`" for k, v in p["grid"].items()), ""]
        missing = [f"{s}: {st}" for s, st in p["runs"].items() if st != "collected"]
        lines += [
            f"Seeds with results: {p['n_runs']} of {len(p['runs'])}"
            + (f" (missing: {'; '.join(missing)})" if missing else "")
            + ".",
            "",
        ]
        if seed_warning(p["n_runs"]):
            lines += [f"**{seed_warning(p['n_runs'])}**", ""]
        idx = _index(p["metrics"])
        heads = headline_metrics(p["metrics"])
        rms = _rms(p["metrics"], "calibration")
        sources = [
            s
            for s in dict.fromkeys(r["scope"] for r in p["metrics"] if r["section"] == "calibration")
            if s not in ("all_average", "hh_average")
        ]
        scopes = ["all_average"] + (["hh_average"] if set(sources) != {"helpful", "harmless"} else [])
        for scope, title in (("all_average", "all-source average"), ("hh_average", "Helpful & Harmless average")):
            if scope not in scopes or not any(("calibration", rm, scope, "accuracy") in idx for rm in rms):
                continue
            cols = [m for m in heads if m != "temperature" or scope == "all_average"]
            lines += [
                f"### Calibration, {title}",
                "",
                "| RM | "
                + " | ".join(metric_label(m) + (" (%)" if m in PERCENT_METRICS else "") for m in cols)
                + " |",
                "|---" * (len(cols) + 1) + "|",
                "| *better* | " + " | ".join(DIRECTION_TEXT[direction(m)] for m in cols) + " |",
            ]
            for rm in rms:
                lines.append(
                    f"| {rm_label(rm)} | "
                    + " | ".join(cell(idx.get(("calibration", rm, scope, m)), m) for m in cols)
                    + " |"
                )
            lines.append("")
        ece = next((m for m in heads if m.startswith("ece_")), None)
        if sources and ece:
            for m in (ece, f"ts_{ece}"):
                lines += [
                    f"### {metric_label(m)} per source ({DIRECTION_TEXT[direction(m)]})",
                    "",
                    "| RM | " + " | ".join(sources) + " |",
                    "|---" * (len(sources) + 1) + "|",
                ]
                for rm in rms:
                    lines.append(
                        f"| {rm_label(rm)} | "
                        + " | ".join(cell(idx.get(("calibration", rm, s, m)), m) for s in sources)
                        + " |"
                    )
                lines.append("")
        pols = _rms(p["metrics"], "align")
        if pols:
            sets = sorted(
                {r["scope"] for r in p["metrics"] if r["section"] == "align" and r["metric"] == "gold_reward"}
            )
            lines += [
                "### Aligned policies: gold reward (higher is better)",
                "",
                "| policy | " + " | ".join(sets) + " |",
                "|---" * (len(sets) + 1) + "|",
            ]
            for pol in pols:
                lines.append(
                    f"| {pol} | " + " | ".join(cell(idx.get(("align", pol, s, "gold_reward"))) for s in sets) + " |"
                )
            lines.append("")
        judged = sorted({r["rm"] for r in p["metrics"] if r["section"] == "judge"})
        if judged:
            lines += [
                "### Judgements (all prompt sets)",
                "",
                "| comparison | win rate (%) | lose rate (%) | win - lose (points) |",
                "|---|---|---|---|",
            ]
            for j in judged:
                lines.append(
                    f"| {j} | "
                    + " | ".join(
                        cell(idx.get(("judge", j, "all", m)), m) for m in ("win_rate", "lose_rate", "win_minus_lose")
                    )
                    + " |"
                )
            lines.append("")
        keys = key_metrics(heads)
        diffs = [
            d
            for d in p["differences"]
            if (d["section"] == "calibration" and d["scope"] in scopes and d["metric"] in keys)
            or (d["section"] == "align" and d["metric"] == "gold_reward" and d["scope"] == "all")
        ]
        diffs.sort(
            key=lambda d: (
                d["section"] != "calibration",
                d["scope"] != "all_average",
                keys.index(d["metric"]) if d["metric"] in keys else 0,
            )
        )
        if diffs:
            lines += [
                "### Seed-paired differences",
                "",
                f"| difference | metric | better | scope | mean [{conf} CI] | p | n | verdict |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for d in diffs:
                sig = VERDICTS[is_significant(d)]
                lines.append(
                    f"| {rm_label(d['a'])} - {rm_label(d['b'])} | {metric_label(d['metric'])} | "
                    f"{DIRECTION_TEXT[direction(d['metric'])]} | {d['scope']} | {cell(d, d['metric'])} | "
                    f"{p_text(d.get('p_value')) or '-'} | {d['n']} | {sig} |"
                )
            lines += ["", "In words:", ""]
            lines += [f"- {d['sentence']}" for d in diffs if d["section"] == "align" or d["scope"] == "all_average"]
            lines.append("")
    lines += ["## Summary", "", summary_paragraph(summary), ""]
    return "\n".join(lines).rstrip() + "\n"


def summary_paragraph(summary: dict) -> str:
    """One paragraph naming every significant seed-paired difference in summary.json (every point, scope and
    metric), by the project's rule."""
    findings, n_tested = [], 0
    for name, p in summary["points"].items():
        for d in p["differences"]:
            sig = is_significant(d)
            if sig is None:
                continue
            n_tested += 1
            if not sig:
                continue
            what = f"{metric_label(d['metric'])}, {d['scope']}"
            scale = 100.0 if d["metric"] in PERCENT_METRICS else 1.0
            better = direction(d["metric"])
            a, b = rm_label(d["a"]), rm_label(d["b"])
            _, judgement = judge(d)
            verdict = "" if judgement is None else f", {a if judgement == 'better' else b} better"
            if judgement and better == "closer to 1":
                verdict += " (closer to 1)"
            point = f"{name}: " if len(summary["points"]) > 1 else ""
            findings.append(
                f"{point}{a} - {b}, {what} {d['mean'] * scale:+.4g} [{d['low'] * scale:+.4g}, "
                f"{d['high'] * scale:+.4g}], {p_text(d.get('p_value'))}{verdict}"
            )
    return significance_paragraph(findings, n_tested, "seed-paired difference")


def overview(summary: dict) -> list[str]:
    """Across grid points: each RM's all-source ECE (before / after temperature scaling) and the paired
    differences with their verdicts, one row per point."""
    allm = [m for p in summary["points"].values() for m in p["metrics"]]
    heads = headline_metrics(allm)
    rms = _rms(allm, "calibration")
    out = []
    for metric in [m for m in heads if re.fullmatch(r"(ts_)?ece_\d+", m) or m == "temperature"]:
        pairs = [(a, b) for a, b in PAIRS if a in rms and b in rms]
        out += [
            f"## Overview: {metric_label(metric)}, all-source average",
            "",
            "| point | "
            + " | ".join(rm_label(r) for r in rms)
            + " | "
            + " | ".join(f"{rm_label(a)} - {rm_label(b)}" for a, b in pairs)
            + " |",
            "|---" * (1 + len(rms) + len(pairs)) + "|",
        ]
        for name, p in summary["points"].items():
            idx = _index(p["metrics"])
            diffs = []
            for a, b in pairs:
                d = next(
                    (
                        x
                        for x in p["differences"]
                        if x["section"] == "calibration"
                        and x["a"] == a
                        and x["b"] == b
                        and x["scope"] == "all_average"
                        and x["metric"] == metric
                    ),
                    None,
                )
                diffs.append("-" if d is None else f"{cell(d, metric)} {VERDICTS[is_significant(d)]}")
            out.append(
                f"| {name} | "
                + " | ".join(cell(idx.get(("calibration", r, "all_average", metric)), metric) for r in rms)
                + " | "
                + " | ".join(diffs)
                + " |"
            )
        out.append("")
    return out


def _number(text: str):
    try:
        v = yaml_load(text)
    except Exception:  # noqa: BLE001 - any unparsable value is plotted as a category
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


PLOT_METRICS = ("ece", "ts_ece", "accuracy", "temperature")


def _axis_label(metric: str) -> str:
    """A panel's y-axis label: the metric, its unit and which direction is better."""
    unit = " (%)" if metric in PERCENT_METRICS else ""
    return f"{metric_label(metric)}{unit}\n({DIRECTION_TEXT[direction(metric)]})"


def _finite(x) -> float | None:
    """x as a float when it is a finite number, else None (a summary may hold None, NaN, inf or a string)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _scaled(x, scale: float) -> float | None:
    """scale * x when both it and x are finite numbers (1e306 in percent overflows), else None."""
    x = _finite(x)
    return None if x is None else _finite(scale * x)


def band_arrays(xs: list, rows: list, scale: float = 1.0):
    """The line and band of one RM in a grid plot: (x, mean, low, high) float arrays over the grid points
    whose summary row has a finite mean; a missing or non-finite interval end is the mean itself (a zero-width
    band). Every array is finite, so matplotlib never sees NaN, inf or None."""
    import numpy as np

    out = []
    for x, r in zip(xs, rows):
        m = _scaled((r or {}).get("mean"), scale)
        if m is None:
            continue
        lo, hi = _scaled(r.get("low"), scale), _scaled(r.get("high"), scale)
        out.append((x, m, m if lo is None else lo, m if hi is None else hi))
    cols = list(zip(*out)) if out else [(), (), (), ()]
    return tuple(np.asarray(c, dtype=np.float64) for c in cols)


def seed_bar(row: dict | None, scale: float = 1.0) -> dict | None:
    """What plot_seeds.png draws for one RM and metric: its finite per-seed values, the mean and the interval
    ends (None when either is missing or non-finite), all scaled; None without a finite mean. The interval is
    drawn as a segment from low to high, so a mean outside it (values outside the metric's range, where the
    interval was clipped) cannot produce a negative error bar."""
    import numpy as np

    m = _scaled((row or {}).get("mean"), scale)
    if m is None:
        return None
    values = row.get("values") or {}
    values = values.values() if isinstance(values, dict) else values
    vals = [v for v in (_scaled(x, scale) for x in values) if v is not None]
    lo, hi = _scaled(row.get("low"), scale), _scaled(row.get("high"), scale)
    if lo is None or hi is None:
        lo = hi = None
    return {"values": np.asarray(vals, dtype=np.float64), "mean": m, "low": lo, "high": hi}


def write_plots(out_dir: Path, summary: dict) -> list[str]:
    """PNGs of the all-source averages of the headline metrics (accuracy in %, ECE before / after temperature
    scaling, temperature), one colour per RM (`plots.color_for`), y axes labelled, legend below the panels.

    With a grid: one PNG per grid axis (and per combination of the other axes' values), each metric vs the
    axis value, one line per RM, the t-interval as a band. Without a grid (seeds only): plot_seeds.png, each
    RM's per-seed values as dots with the mean and its t-interval. Returns the file names."""
    grid = summary["sweep"].get("grid") or []
    points = summary["points"]
    if not points:
        return []
    heads = headline_metrics([m for p in points.values() for m in p["metrics"]])
    ece = next((m for m in heads if m.startswith("ece_")), None)
    panels = [m for m in ("accuracy", ece, f"ts_{ece}" if ece else None, "temperature") if m and m in heads]
    if not panels:
        return []
    from pipeline.calibration.plots import _plt, _save, color_for, legend_below

    plt = _plt()
    conf = f"{100 * summary['confidence']:.0f}%"
    if not grid:
        return [_seed_plot(plt, out_dir, summary, panels, conf, _save, color_for, legend_below)]
    keys = [k for k, _ in grid]
    labels = axis_labels(keys)
    written = []
    for key, values in grid:
        others = [k for k in keys if k != key]
        combos = itertools.product(*(dict(grid)[k] for k in others)) if others else [()]
        for combo in combos:
            fixed = dict(zip(others, combo))
            nums = [_number(v) for v in values]
            xs = nums if all(n is not None for n in nums) else list(range(len(values)))
            fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
            handles: dict = {}
            for ax, metric in zip(axes[0], panels):
                scale = 100.0 if metric in PERCENT_METRICS else 1.0
                rms = []
                for p in points.values():
                    rms += [r["rm"] for r in p["metrics"] if r["section"] == "calibration" and r["metric"] == metric]
                for rm in sorted(set(rms), key=lambda n: (n not in RM_LABELS, n)):
                    rows = []
                    for v in values:
                        pt = next(
                            (
                                p
                                for p in points.values()
                                if p["grid"].get(key) == v and all(p["grid"].get(k) == fv for k, fv in fixed.items())
                            ),
                            None,
                        )
                        rows.append(
                            _index(pt["metrics"]).get(("calibration", rm, "all_average", metric)) if pt else None
                        )
                    xx, ys, lo, hi = band_arrays(xs, rows, scale)
                    if len(xx):
                        c = color_for(rm)
                        handles[rm_label(rm)] = ax.plot(xx, ys, marker="o", color=c, lw=1.8)[0]
                        ax.fill_between(xx, lo, hi, alpha=0.2, color=c)
                if metric == "temperature":
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xlabel(labels[key])
                ax.set_ylabel(_axis_label(metric))
                ax.set_title(metric_label(metric) + " (all sources)")
                if xs != nums:
                    ax.set_xticks(xs, values)
                ax.grid(alpha=0.3)
            legend_below(fig, list(handles.values()), list(handles))
            sub = "" if not fixed else " (" + ", ".join(f"{labels[k]}={v}" for k, v in fixed.items()) + ")"
            fig.suptitle(f"mean and {conf} t-interval over seeds{sub}")
            fig.tight_layout()
            name = "plot_" + _safe(labels[key]) + "".join("__" + _safe(f"{labels[k]}={v}") for k, v in fixed.items())
            _save(fig, out_dir / f"{name}.png")
            written.append(f"{name}.png")
    return written


def _seed_plot(plt, out_dir: Path, summary: dict, panels: list[str], conf: str, save, color_for, legend_below) -> str:
    """plot_seeds.png of a sweep without a grid: per panel, each RM's per-seed values (dots) and its mean with
    the t-interval (bar; clipped to the metric's range)."""
    import numpy as np

    p = next(iter(summary["points"].values()))
    idx = _index(p["metrics"])
    rms = _rms(p["metrics"], "calibration")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.0), squeeze=False)
    handles: dict = {}
    for ax, metric in zip(axes[0], panels):
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        for i, rm in enumerate(rms):
            bar = seed_bar(idx.get(("calibration", rm, "all_average", metric)), scale)
            if bar is None:
                continue
            c = color_for(rm)
            vals = bar["values"]
            if vals.size:
                jitter = np.linspace(-0.12, 0.12, vals.size) if vals.size > 1 else np.zeros(1)
                ax.scatter(i + jitter, vals, color=c, alpha=0.5, s=22, zorder=2)
            if bar["low"] is not None:  # the interval as a segment: drawn as given, even if it misses the mean
                ax.vlines(i + 0.3, bar["low"], bar["high"], color=c, lw=1.5)
                ax.hlines([bar["low"], bar["high"]], i + 0.24, i + 0.36, color=c, lw=1.5)
            handles[rm_label(rm)] = ax.plot(i + 0.3, bar["mean"], "D", color=c, ms=6)[0]
        if metric == "temperature":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rms)), [rm_label(r) for r in rms])
        ax.set_xlim(-0.5, len(rms) - 0.3)
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(metric_label(metric) + " (all sources)")
        ax.grid(alpha=0.3, axis="y")
    legend_below(fig, list(handles.values()), list(handles))
    n = p["n_runs"]
    warn = f"; only {n} seeds: very wide intervals" if 2 <= n < MIN_SEEDS else ""
    fig.suptitle(
        f"dots: seeds; diamond and bar: mean and {conf} t-interval over {n} seeds (clipped to the range){warn}"
    )
    fig.tight_layout()
    save(fig, out_dir / "plot_seeds.png")
    return "plot_seeds.png"


# ---------------------------------------------------------------------------------------------------
# Command line


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
            if _is_main():
                (resummarize if args.from_summary else aggregate)(args.aggregate)
                _say(f"wrote {Path(args.aggregate) / 'summary.md'} and summary.json")
            return 0
        if not args.output_dir:
            raise RecipeError("--output-dir D is required (or --aggregate D to re-aggregate an existing sweep)")
        if args.parallel < 1:
            raise RecipeError(f"--parallel must be >= 1, got {args.parallel}")
        if args.parallel > 1 and _world() > 1:
            raise RecipeError(
                "--parallel N runs subprocesses and cannot be combined with accelerate launch/"
                "torchrun (there every run already uses all processes); drop --parallel"
            )
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
        if args.dry_run:
            if _is_main():
                for r in runs:
                    state, why = run_state(load_recipe(args.recipe, r.overrides), Path(r.dir), args.stages)
                    if exporter and exporter.is_exported(r):
                        state, why = "done", f"exported to {exporter.dest(r)}"
                    print(f"{state:5s} {r.point} seed-{r.seed}  {r.dir}  ({why})")
                    print(f"      overrides: {' '.join(r.overrides)}")
                print(f"{len(runs)} runs ({len(points)} point(s) x {len(seeds)} seed(s))")
            return 0
        if _is_main():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / SWEEP_FILE, definition)
            if exporter:
                exporter.write_definition()
        _say(f"{len(runs)} runs ({len(points)} point(s) x {len(seeds)} seed(s)) in {out}")
        if args.parallel > 1:
            failed = run_parallel(args.recipe, runs, args.stages, args.parallel, exporter)
        else:
            failed = run_sequential(args.recipe, runs, args.stages, exporter)
        if _is_main():
            final = exporter.root if exporter else out  # the export holds every finished run, on any machine
            aggregate(final)
            _say(f"wrote {final / 'summary.md'} and summary.json")
        if failed:
            _say(f"{len(failed)} run(s) failed; rerun the same command to retry them:")
            for d, why in failed.items():
                _say(f"  {d}: {why}")
            return 1
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}); run the same command again to resume the sweep", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from pipeline.run import _on_sigterm, _setup_logging, threading_is_main

    _setup_logging()
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main())
