"""The definition of a sweep: seeds, the grid of settings, its points' names and every run's overrides.

Every (grid point x seed) is one ordinary `pipeline.run` run directory, D/<point>/seed-<s>/, built from the
recipe, the command-line overrides, the grid point's values and the seed, in that order (`build_runs`). The
seed is written into EVERY seed field of the resolved recipe (`seed_overrides`), so seed s is one independent
replicate of the whole run. A point's name is readable: `drift_scale=0.5` (several axes joined by `__`;
`default` without a grid). D/sweep.json (`SWEEP_FILE`) records the definition; `check_definition` refuses one
that is corrupt, or whose point names or seeds would lead outside D, in one line.

Imports: pipeline.config (the recipe loader) and the leaf pipeline.errors; nothing else of the sweep.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import load_recipe, recipe_to_dict
from pipeline.errors import RecipeError


SWEEP_FILE = "sweep.json"


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


_POINT_NAME = re.compile(r"[A-Za-z0-9._=+-]+")


def is_point_name(name) -> bool:
    """A grid point's name as `grid_points` makes it: one plain path component (letters, digits, ._=+-),
    never '.' or '..', so D/<point>/ stays inside D."""
    return isinstance(name, str) and bool(_POINT_NAME.fullmatch(name)) and name not in (".", "..")


def _is_seed(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _definition_problem(sweep) -> str | None:
    """What is wrong with a sweep definition read from disk (None when it is sound)."""
    if not isinstance(sweep, dict):
        return "not a JSON object"
    if not isinstance(sweep.get("recipe"), str):
        return "'recipe' is missing or not a string"
    seeds = sweep.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(_is_seed(s) for s in seeds):
        return f"'seeds' must be a non-empty list of seeds (integers >= 0), got {str(seeds)[:80]}"
    points = sweep.get("points")
    if not isinstance(points, list) or not points:
        return "'points' (the grid points) is missing or empty"
    for p in points:
        if not isinstance(p, dict) or not isinstance(p.get("values", {}), dict):
            return f"a point must be {{'name', 'values'}}, got {str(p)[:80]}"
        if not is_point_name(p.get("name")):
            return (
                f"point name {p.get('name')!r} is not one plain directory name (letters, digits, ._=+-; "
                "not '..'), so it could lead outside the sweep directory"
            )
    runs = sweep.get("runs", [])
    if not isinstance(runs, list):
        return "'runs' is not a list"
    for r in runs:
        ok = isinstance(r, dict) and is_point_name(r.get("point")) and _is_seed(r.get("seed"))
        if not ok or not isinstance(r.get("overrides", []), list):
            return f"a run must be {{'point', 'seed', 'overrides'}} with a plain point name, got {str(r)[:80]}"
    if not isinstance(sweep.get("grid", []), list) or not isinstance(sweep.get("overrides", []), list):
        return "'grid' and 'overrides' must be lists"
    return None


def check_definition(sweep, where) -> None:
    """One RecipeError naming `where` (a sweep.json) when the definition is corrupt: seeds that are not integers,
    no points, a point name or seed that would make D/<point>/seed-<s>/ leave D."""
    problem = _definition_problem(sweep)
    if problem:
        raise RecipeError(
            f"{where}: {problem}. It is written by python -m pipeline.sweep: restore it, or rerun the sweep "
            "command (with --output-dir, or --export) to write it again"
        )
