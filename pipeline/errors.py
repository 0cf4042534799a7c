"""Errors a user can cause and fix (a leaf: imports nothing of the pipeline).

`RecipeError` is one line naming the recipe key, file or model and the fix; `pipeline.run` prints it
without a traceback and exits with code 2. Stages raise it too (they never import the recipe loader).
Interruptions (Ctrl-C, SIGTERM) and a full disk are recognised here, so the orchestrator records them
and prints one line (`disk_full_message` names the directory, the free space and what the stage needs).
`redact_url` / `redact_credentials` mask a credential written into a URL (`user:pw@host`, `?key=...`) in
everything the pipeline writes or logs (recipe.yaml, manifest.json, messages, sweep summaries and exports).

Imports only `pipeline.logs` (for formatting) beside the standard library, so `pipeline.io` can use it."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.logs import human_bytes


class RecipeError(ValueError):
    """A user-fixable problem in a recipe file, a command-line override or an input it names."""


class StageInterrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so a terminated stage is recorded like Ctrl-C."""


class DiskFull(OSError):
    """A stage ran out of disk space: one message naming the directory and about how much it needs."""


def interruption(e: BaseException) -> str:
    """How the run was interrupted, for messages ('Ctrl-C', 'terminated by signal 15')."""
    return str(e) or "Ctrl-C"


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def disk_full_error(e: BaseException, run_dir: Path) -> OSError | None:
    """The out-of-space error behind `e` (an OSError ENOSPC/EDQUOT anywhere in its chain, or a failed write
    (torch and safetensors wrap it) while the run directory's file system has under 64 MiB free), else None."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return x
    for x in _chain(e):
        text = str(x).lower()
        if "no space left" in text or ("write" in text and free_bytes(run_dir) < 64 << 20):
            return OSError(errno.ENOSPC, str(x))
    return None


def disk_full_message(stage: str, run_dir: Path, err: OSError, need: int, how: str) -> str:
    """One line: where the stage ran out of space, what is free there and an estimate of what it needs."""
    where = Path(err.filename).parent if getattr(err, "filename", None) else Path(run_dir)
    amount = f"about {human_bytes(need)} more: {how}" if need else "more (no estimate: it had written nothing yet)"
    return (
        f"the {stage} stage ran out of disk space writing in {where} ({human_bytes(free_bytes(where))} free; it "
        f"needs {amount}). Fix: free space there or pass an --output-dir on a larger disk, then rerun the same "
        "command (finished work is kept)"
    )


# ---------------------------------------------------------------------------------------------------
# Credentials inside URLs (a judge base_url with `?key=...` or `user:password@host`)

MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# Query parameters that carry a credential, by name: key, api_key, api-key, access_token, sig, password, ...
_SECRET_PARAM = re.compile(r"key|token|secret|pass|pwd|sig|auth|credential|session|cookie", re.IGNORECASE)
_PARAM = re.compile(r"(^|[&;])([^=&;]*)=([^&;]*)")


def redact_url(url: str) -> str:
    """`url` with its user information (`user:pw@`) and the values of credential-like query parameters
    (`key`, `api_key`, `token`, `sig`, `password`, ...) masked; other parts (`api-version=...`) kept as written."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"

    def mask(m: re.Match) -> str:
        secret = _SECRET_PARAM.search(m.group(2))
        return f"{m.group(1)}{m.group(2)}={MASK if secret and m.group(3) else m.group(3)}"

    query, fragment = _PARAM.sub(mask, parts.query), _PARAM.sub(mask, parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def redact_credentials(obj):
    """Every URL inside `obj` (a string, or the strings of nested dicts, lists and tuples) through `redact_url`."""
    if isinstance(obj, str):
        return _URL.sub(lambda m: redact_url(m.group(0)), obj) if "://" in obj else obj
    if isinstance(obj, dict):
        return {k: redact_credentials(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_credentials(v) for v in obj)
    return obj
