"""Crash-safe file output: write to a temporary sibling, then rename (atomic on POSIX)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory next to `path`; on success replace `path` with it, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------
# Fingerprints of inputs and integrity records of outputs


def sha256_json(obj) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys), for fingerprints."""
    import hashlib

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files_under(root: Path, rel: str) -> list[str]:
    p = root / rel
    if p.is_dir():
        return sorted(str(f.relative_to(root)) for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return [rel] if p.is_file() else []


def file_records(root: str | os.PathLike, paths: list[str], exclude: set[str] | frozenset = frozenset()) -> dict:
    """{file path relative to `root`: {"size", "mtime_ns", "sha256"}} for every file of `paths` (files or
    directories, relative to `root`), minus `exclude`. What a later check compares (`changed_files`)."""
    root = Path(root)
    out = {}
    for rel in paths:
        for f in _files_under(root, rel):
            if f in exclude:
                continue
            st = (root / f).stat()
            out[f] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(root / f)}
    return out


def changed_files(root: str | os.PathLike, records: dict) -> list[str]:
    """Recorded files that are missing, have another size, or (when their mtime moved) another sha256.

    Each entry reads 'PATH (why)'. Files added since the record are not checked."""
    root = Path(root)
    bad = []
    for rel, rec in records.items():
        p = root / rel
        if not p.is_file():
            bad.append(f"{rel} (missing)")
            continue
        st = p.stat()
        if st.st_size != rec.get("size"):
            bad.append(f"{rel} (size {st.st_size}, recorded {rec.get('size')})")
        elif st.st_mtime_ns != rec.get("mtime_ns") and file_sha256(p) != rec.get("sha256"):
            bad.append(f"{rel} (content changed)")
    return bad


def flat_items(obj, prefix: str = "") -> dict:
    """{'a.b.0.c': value} for nested dicts and lists (an empty dict or list is one value)."""
    if isinstance(obj, dict) and obj:
        items = obj.items()
    elif isinstance(obj, (list, tuple)) and obj:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out = {}
    for k, v in items:
        out.update(flat_items(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def dict_changes(old: dict, new: dict, limit: int = 6, width: int = 40) -> str:
    """'reward.train.learning_rate: 0.0001 -> 0.0005; data.seed: <unset> -> 1' (key paths in sorted order)."""
    a, b = flat_items(old), flat_items(new)
    unset = "<unset>"
    keys = sorted(k for k in set(a) | set(b) if a.get(k, unset) != b.get(k, unset))

    def show(d, k):
        v = d.get(k, unset)
        text = v if isinstance(v, str) and v == unset else json.dumps(v, default=str)
        return text if len(text) <= width else text[: width - 3] + "..."

    parts = [f"{k}: {show(a, k)} -> {show(b, k)}" for k in keys[:limit]]
    return "; ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
