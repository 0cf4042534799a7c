"""DIR/reward/index.json: the reward models a run trained, read the same way by every stage.

The reward stage writes one entry per RM, `{name: {"path", "method", "sources", ...}}` (the `dpo` method's also
`"kind": "implicit"` and `"implicit"`, its implicit.json: a policy read as a reward), with paths relative to
the run directory, so a copied or moved run directory stays self-contained. Names that are not safe path
components live under a slug directory (`pipeline.io.safe_component`); the original name is the key."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.io import safe_component


INDEX = Path("reward") / "index.json"


def rm_dir(run_dir: Path, name: str) -> Path:
    """DIR/reward/<name> for a plain RM name; a name that is not a safe path component (a source or group
    name with `/`, `..`, NUL, ... in it) becomes a slug plus a hash (`pipeline.io.safe_component`)."""
    return Path(run_dir) / "reward" / safe_component(name)


def resolve_rm_path(run_dir: Path, name: str, path: str) -> Path:
    """The directory of an index entry. Relative paths are taken from the run directory (`reward/<name>`;
    a bare `<name>`, relative to DIR/reward/, also works). An absolute path into another run directory's
    `reward/<name>` (indexes written before paths were relative, then copied) maps to this run's copy, so
    a copied run never reads or writes the original."""
    run_dir = Path(run_dir).resolve()
    p = Path(path)
    local = rm_dir(run_dir, name)
    if not p.is_absolute():
        for cand in (run_dir / p, run_dir / "reward" / p):
            if cand.exists():
                return cand
        return run_dir / p
    try:
        p.resolve().relative_to(run_dir)
        return p
    except ValueError:
        pass
    if local.exists() and p.name == local.name and p.parent.name == "reward":
        return local
    return p


def read_index(run_dir: Path, only: list[str] | None = None, *, key: str = "rms") -> dict:
    """DIR/reward/index.json with every entry's `path` resolved (`resolve_rm_path`; a run directory that was
    moved finds its own copy) and `method` / `sources` filled in; `only` keeps those names, in that order (an
    unknown name is an error naming `key`, the recipe key that asked for it). One clear error for a missing or
    malformed index."""
    run_dir = Path(run_dir)
    path = run_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the reward stage first (python -m pipeline.run --stages reward)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the reward stage (--force reward)") from None
    if not isinstance(index, dict) or not index:
        raise ValueError(f"{path} lists no reward models")
    if only is not None:
        unknown = [n for n in only if n not in index]
        if unknown:
            raise ValueError(f"{key}: {unknown} not in {path} (it lists {sorted(index)})")
        index = {n: index[n] for n in only}
    out = {}
    for name, entry in index.items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{path}: entry {name!r} has no 'path' field")
        p = resolve_rm_path(run_dir, name, entry["path"])
        if not p.exists() and rm_dir(run_dir, name).exists():  # the run dir was moved
            p = rm_dir(run_dir, name)
        out[name] = {
            **entry,
            "path": str(p),
            "method": entry.get("method", "unknown"),
            "sources": list(entry.get("sources", [])),
        }
    return out


def implicit_spec(run_dir: Path, name: str, entry: dict) -> dict:
    """An implicit RM's descriptor (its directory's implicit.json: {"policy", "reference", "beta"}, written by the
    reward stage's dpo method) with the paths relative to the run directory resolved; one error naming the file."""
    path = Path(entry["path"]) / "implicit.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"implicit RM {name!r}: cannot read {path} ({e}); rerun the reward stage (--force reward)"
        ) from None

    def resolve(p):
        if p is None:
            return None
        local = Path(run_dir) / str(p)
        return str(local) if local.exists() else str(p)

    return {**spec, "policy": resolve(spec.get("policy")), "reference": resolve(spec.get("reference"))}
