"""DIR/manifest.json: what ran in a run directory (written atomically, by the main process only).

    {"stages": {name: {"status": "done"|"failed"|"interrupted"|"running"|"skipped", "config_hash", "started",
                       "finished", "artifacts": [...], "artifact_files": {path: {"size", "mtime_ns", "sha256"}},
                       "reason", "upstream": {name: run_id}, "run_id", "inputs", "input_files", "world_size",
                       "error"?, "stale"?}},
     "versions": {...}, "git_commit": ..., "recipe": <resolved recipe>}

"failed" is a stage that raised (its error in "error"), "interrupted" one stopped by Ctrl-C or SIGTERM, "running"
one whose process died without a word (kill -9). "inputs" are the recipe sections its hash covers, "input_files"
the content hashes of the local files they name (`pipeline.plan.input_digests`), so a later plan names what
changed. Stages are written in pipeline order (`pipeline.stages.STAGES`), so a reader (the report) can list them as
they are. Artifact records hold the size, mtime and sha256 of every file a stage wrote; a stage whose files
changed since it finished reruns (`pipeline.plan`).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from pipeline import stages as stage_table
from pipeline.errors import RecipeError, redact_credentials
from pipeline.io import atomic_write_json, dict_changes, file_records, remove_tree


MANIFEST = "manifest.json"
VERSION_PACKAGES = ("torch", "trl", "transformers", "accelerate", "deepspeed", "peft", "datasets")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


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
    """Write atomically, the stages in pipeline order (unknown names, e.g. of an older layout, last); a credential
    inside a URL (the resolved recipe's judge base_url, an error message) is masked (`redact_credentials`)."""
    order = {n: i for i, n in enumerate(stage_table.stage_names())}
    manifest["stages"] = dict(sorted(manifest["stages"].items(), key=lambda kv: order.get(kv[0], len(order))))
    atomic_write_json(Path(run_dir) / MANIFEST, redact_credentials(manifest))


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


def normalize_artifacts(run_dir: Path, stage: str, artifacts) -> list[str]:
    """Artifact paths relative to run_dir; a path outside it or a file the stage did not write is a bug."""
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


def artifact_records(run_dir: Path, stage: str, artifacts: list[str], manifest: dict) -> dict:
    """Size, mtime and sha256 of every file of the stage's artifacts, checked before the stage is skipped
    (a truncated or edited artifact reruns it). Files another stage owns (e.g. calibration's
    reward/<rm>/temperature.json inside the reward stage's RM directory) are left to that stage."""
    others = set()
    for other, entry in manifest.get("stages", {}).items():
        if other != stage:
            others |= set(entry.get("artifact_files", {})) | set(entry.get("artifacts", []))
    return file_records(run_dir, artifacts, exclude=others)


def last_duration(entry: dict | None) -> float | None:
    """Seconds the stage's last finished run took (from the manifest), or None."""
    if not entry or entry.get("status") != "done" or not entry.get("started") or not entry.get("finished"):
        return None
    start, end = (_dt.datetime.fromisoformat(entry[k]) for k in ("started", "finished"))
    return (end - start).total_seconds()


def recorded_recipe(manifest: dict, current: str | None = None) -> tuple[dict | None, list[str]]:
    """The recipe this run directory's results were produced with, for DIR/recipe.yaml, and notes for its header.

    Each stage's section is the one that stage last ran with here (its manifest entry's `inputs`); a stage that
    never ran here is left out (its section takes the defaults) and `stages` lists the ones that did, so the file
    never states settings no result here was produced with. A note names each stage whose last attempt did not
    finish (failed, interrupted: its section is that attempt's, which the same command resumes) or whose results
    are STALE. `data` and `seed` are those of the last stage in pipeline order; a note names each earlier stage
    that ran with other ones. The top-level keys (name, description, output_dir, data_root) are the last
    command's. None when no stage has run here. `current` is the stage starting now (not noted as unfinished)."""
    entries = manifest.get("stages", {})
    order = stage_table.stage_names()
    ran = [s for s in order if isinstance((entries.get(s) or {}).get("inputs"), dict)]
    if not ran:
        return None, []
    last = entries[ran[-1]]["inputs"]
    out = {}
    for key, value in (manifest.get("recipe") or {}).items():
        if key in order:
            if key in ran:
                out[key] = entries[key]["inputs"].get(key)
        elif key in ("seed", "data"):
            out[key] = last.get(key)
        elif key == "stages":
            out[key] = None if ran == order else ran
        else:
            out[key] = value
    return out, _recipe_notes(entries, ran, current)


def _recipe_notes(entries: dict, ran: list[str], current: str | None) -> list[str]:
    """recipe.yaml's header notes: unfinished and STALE stages, and earlier stages with other data or seed."""
    notes = []
    for s in ran:
        status = entries[s].get("status")
        if status != "done" and s != current:
            notes.append(f"{s} did not finish here ({status}): its section is the one its last attempt ran with")
        elif entries[s].get("stale") and s != current:
            notes.append(f"{s} is STALE ({entries[s]['stale']}): its results were computed before that")
    last = entries[ran[-1]]["inputs"]
    for s in ran[:-1]:
        theirs = {k: entries[s]["inputs"].get(k) for k in ("seed", "data")}
        if changes := dict_changes({k: last.get(k) for k in theirs}, theirs, limit=4, width=30):
            notes.append(f"{s} ran with other data or seed settings than {ran[-1]} (here -> {s}): {changes}")
    return notes


def upstream_tokens(entries: dict, upstream: list[str]) -> dict[str, str]:
    """run_id of every finished upstream stage: a stage must rerun when one of these changes."""
    return {
        u: entries[u]["run_id"]
        for u in upstream
        if u in entries and entries[u].get("status") == "done" and entries[u].get("run_id")
    }
