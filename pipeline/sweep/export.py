"""--export E: each finished run's small results copied to E/<point>/seed-<s>/, a results folder that outlives
the machine.

As soon as a run finishes, `export_run` copies `EXPORT_GLOBS` (no weights or checkpoints; absolute paths of
this machine made relative, `strip_paths`) with E/.../export.json (overrides + `run_fingerprint`). A run
exported with the same fingerprint is skipped (`Exporter.is_exported`), so on a new machine only unfinished
runs run; `--aggregate E` works from E alone: `export_mismatch` says why an export does not belong (its
overrides, stages, recipe, or its run fingerprint, which E/sweep.json records per run), and `settings_outliers`
separates runs of one point whose exported recipe.yaml (seeds aside) disagree (a definition written before the
fingerprints were recorded).

Imports: pipeline.config, the leaves pipeline.io and pipeline.errors, pipeline.sweep.grid and pipeline.sweep.runner (its messages).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.config import load_recipe, recipe_to_dict
from pipeline.errors import redact_credentials
from pipeline.io import atomic_dir, atomic_write_json, dict_changes, read_json, sha256_json
from pipeline.sweep.grid import SWEEP_FILE, SweepRun
from pipeline.sweep.runner import _say


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
    info = read_json(Path(dest) / EXPORT_FILE)
    return isinstance(info, dict) and info.get("fingerprint") == fingerprint


def _export_info(recipe_arg: str, r: SweepRun, stages, fingerprint: str) -> dict:
    return {
        "recipe": recipe_label(recipe_arg),
        "point": r.point,
        "seed": r.seed,
        "overrides": redact_credentials(list(r.overrides)),
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
        """E/sweep.json: the definition, each run with its directory in E and its run fingerprint (what
        `--aggregate E` compares each export.json with)."""
        runs = [
            {**run, "dir": f"{run['point']}/seed-{run['seed']}", "fingerprint": self.fingerprint(SweepRun(**run))}
            for run in self.definition["runs"]
        ]
        definition = {**self.definition, "recipe": recipe_label(self.recipe_arg), "runs": runs, "export": True}
        definition = redact_credentials(definition)  # a results folder to commit: no credential in a URL
        atomic_write_json(self.root / SWEEP_FILE, _portable(definition, _machine_roots(self.out_dir)))

    def is_exported(self, r: SweepRun) -> bool:
        return exported(self.dest(r), self.fingerprint(r))

    def export(self, r: SweepRun) -> None:
        files = export_run(
            Path(r.dir), self.dest(r), _export_info(self.recipe_arg, r, self.stages, self.fingerprint(r)), self.out_dir
        )
        _say(f"{r.point} seed {r.seed}: exported {len(files)} files to {self.dest(r)}")


def export_mismatch(info, sweep: dict, run: dict) -> str:
    """Why an exported run does not belong to the sweep's definition ('' when it does): the recipe, the
    stages and the run's overrides (grid values and seed included) must be the ones recorded at export, and
    its run fingerprint (`run_fingerprint`: the resolved recipe, so a recipe FILE edited since counts) the one
    E/sweep.json records for the run (definitions written before it was recorded have none)."""
    if not isinstance(info, dict):
        return "no export.json: the run has not finished"
    for key, want in (
        ("recipe", sweep.get("recipe")),
        ("stages", sweep.get("stages")),
        ("overrides", redact_credentials(run["overrides"])),  # exported masked (`redact_credentials`)
    ):
        if redact_credentials(info.get(key)) != want:
            return f"its {key} differ from the sweep's definition"
    want = run.get("fingerprint")
    if want and info.get("fingerprint") != want:
        return (
            f"made with other settings than the sweep's definition (its run fingerprint "
            f"{str(info.get('fingerprint'))[:10]} is not the definition's {str(want)[:10]})"
        )
    return ""


def _without_seeds(obj):
    """A resolved recipe with every seed field (`seed`, `*_seed`) and `output_dir` blanked: what runs of one grid
    point must share."""
    if isinstance(obj, dict):
        return {
            k: (
                None
                if isinstance(k, str) and (k in ("seed", "output_dir") or k.endswith("_seed"))
                else _without_seeds(v)
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_without_seeds(v) for v in obj]
    return obj


def run_settings(run_dir: Path) -> dict | None:
    """An exported run's resolved recipe (its recipe.yaml) without its seeds; None when it has none."""
    try:
        data = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return _without_seeds(data) if isinstance(data, dict) else None


def settings_change(ref: tuple[int, dict], run_dir: Path) -> str:
    """'recipe.yaml differs from seed 0's: key: a -> b' for the run in `run_dir` against `ref` = (seed, settings);
    '' when it has no recipe.yaml or the same settings."""
    mine = run_settings(run_dir)
    if mine is None or mine == ref[1]:
        return ""
    return f"its recipe.yaml differs from seed {ref[0]}'s: {dict_changes(ref[1], mine, limit=3)}"


def settings_outliers(dirs: dict) -> dict:
    """{seed: why} of the runs of one point ({seed: run directory}) whose settings (recipe.yaml without its seeds)
    differ from those most of the point's runs share (the lowest seed's group on a tie); runs without a
    recipe.yaml are not compared."""
    settings = {seed: st for seed, d in sorted(dirs.items()) if (st := run_settings(d)) is not None}
    groups: dict[str, list[int]] = {}
    for seed, st in settings.items():
        groups.setdefault(sha256_json(st), []).append(seed)
    if len(groups) < 2:
        return {}
    keep = max(groups.values(), key=lambda seeds: (len(seeds), -seeds[0]))
    ref = (keep[0], settings[keep[0]])
    return {
        seed: f"made with other settings than the point's other runs ({settings_change(ref, dirs[seed])})"
        for seed in settings
        if seed not in keep
    }
