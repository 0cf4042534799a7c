"""DIR/manifest.json: what ran in a run directory (written atomically, by the main process only).

    {"stages": {name: {"status": "done"|"failed"|"running"|"skipped", "config_hash", "started", "finished",
                       "artifacts": [...], "artifact_files": {path: {"size", "mtime_ns", "sha256"}},
                       "reason", "upstream": {name: run_id}, "run_id", "inputs", "world_size", "error"?,
                       "stale"?}},
     "versions": {...}, "git_commit": ..., "recipe": <resolved recipe>}

Stages are written in pipeline order (`pipeline.stages.STAGES`), so a reader (the report) can list them as
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
from pipeline.io import atomic_write_json, file_records, remove_tree


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


def upstream_tokens(entries: dict, upstream: list[str]) -> dict[str, str]:
    """run_id of every finished upstream stage: a stage must rerun when one of these changes."""
    return {
        u: entries[u]["run_id"]
        for u in upstream
        if u in entries and entries[u].get("status") == "done" and entries[u].get("run_id")
    }
