"""Reading preference data files in file order: every record with a human-readable location ("file, line N").

`read_records(path, split, name, data_dir, source)` reads a single file (``.json`` (a JSON array, one
object, or JSON lines whatever the extension says), ``.jsonl``, ``.json.gz``/``.jsonl.gz``, ``.parquet``),
a directory in the hub's layout (data files named after the split, ``name``/``data_dir`` sub-directories),
a ``save_to_disk`` directory, or a hub dataset id (``pipeline.io.is_hub_id``, through
``datasets.load_dataset``). Bad input (a truncated .gz file, a non-UTF-8 byte, malformed JSON, a missing
split, a JSON value nested deeper than Python's parser allows, a decompressed .gz line over `MAX_GZ_LINE_BYTES`)
is one :class:`~pipeline.data.formats.base.PreferenceDataError` naming the file, the line and the fix.

Imports: the standard library, `pipeline.io` and `pipeline.data.formats.base` (the error type); `datasets` and
`pyarrow` inside the functions that need them.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.io import is_hub_id

from .formats.base import _err


logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
# The longest line a .gz file may hold once decompressed: a small file can decompress to a huge line (a 204 KB
# file to one 200 MB line), which JSON parsing would then hold several times over in memory. JSON lines hold
# one record per line, far below this; a larger JSON array in one line: store it uncompressed or as JSON lines.
MAX_GZ_LINE_BYTES = 64 << 20
_GZ_CHUNK = 1 << 20


def _gunzip(path: Path, source: str) -> bytes:
    """The decompressed bytes of a .gz file, read in chunks; a line longer than `MAX_GZ_LINE_BYTES` stops the
    reading at once (before it is held whole) with one error naming the file, the line and the limit."""
    max_line = MAX_GZ_LINE_BYTES
    chunks, line_len, newlines = [], 0, 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(_GZ_CHUNK):
            parts = chunk.split(b"\n")
            for k, part in enumerate(parts):
                line_len += len(part)
                if line_len > max_line:
                    raise _err(
                        source,
                        f"{path}, line {newlines + k + 1}",
                        f"a decompressed line longer than {max_line >> 20} MiB (the limit of a .gz line, "
                        "pipeline.data.read.MAX_GZ_LINE_BYTES)",
                        "store one record per line (JSON lines), or the file uncompressed",
                    )
                if k < len(parts) - 1:
                    line_len = 0
            newlines += len(parts) - 1
            chunks.append(chunk)
    return b"".join(chunks)


def _read_text(path: Path, source: str) -> str:
    """The file's text (gunzipped for .gz, `_gunzip`: each line at most MAX_GZ_LINE_BYTES); a UTF-8 BOM is
    accepted; a truncated gzip file or a byte that is not UTF-8 is one clear error naming the file (and the
    line)."""
    try:
        if path.name.endswith(".gz"):
            data = _gunzip(path, source)
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _err(
            source,
            str(path),
            f"truncated or corrupt gzip file ({type(e).__name__}: {e})",
            "re-download or re-compress the file (gzip -t checks it)",
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _err(
            source,
            f"{path}, line {line}",
            f"byte {data[e.start]:#04x} is not UTF-8 (the file is in another encoding, e.g. Latin-1)",
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _too_deep(source: str, where: str):
    return _err(
        source,
        where,
        f"a JSON value nested deeper than the parser can read (Python's recursion limit, {sys.getrecursionlimit()})",
        "flatten that record: preference data needs a few levels (a conversation's messages), not thousands",
    )


def _loads(text: str, source: str, where: str):
    """json.loads, a record nested too deeply for the parser being one clear error naming `where`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _too_deep(source, where) from None


def _read_json_file(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    """A JSON array, a single JSON object, or JSON lines (decided from the content, not the extension)."""
    text = _read_text(path, source)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[":
        try:
            data = _loads(text, source, str(path))
        except json.JSONDecodeError as e:
            raise _err(
                source,
                f"{path}, line {e.lineno}",
                f"malformed JSON array ({e.msg})",
                "repair the file or re-export it as JSON lines",
            ) from None
        for i, rec in enumerate(data):
            yield rec, f"{path}, record {i}"
        return
    lines = text.splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = _loads(line, source, f"{path}, line {i}")
        except json.JSONDecodeError as e:
            if i == 1 and stripped[0] == "{":  # maybe one pretty-printed object
                try:
                    yield _loads(text, source, str(path)), f"{path}, record 0"
                    return
                except json.JSONDecodeError:
                    pass
            raise _err(
                source,
                f"{path}, line {i}",
                f"malformed JSON line ({e.msg} at column {e.colno})",
                "fix or delete that line (each line must hold one complete JSON object)",
            ) from None
        yield rec, f"{path}, line {i}"


def _read_parquet(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise _err(source, str(path), f"not a readable parquet file ({e})", "check the file") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield rec, f"{path}, row {i}"
            i += 1


def _read_file(path: Path, source: str) -> Iterator[tuple[dict, str]]:
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path, source)
    elif path.name.endswith(DATA_SUFFIXES):
        yield from _read_json_file(path, source)
    else:
        raise _err(source, str(path), "unsupported file type", f"use one of {', '.join(DATA_SUFFIXES)}")


def _split_of(filename: str) -> str | None:
    """The split a data file is named after: its first token (`test.jsonl.gz`, `train-00000-of-00001.parquet`)
    or a dotted middle token (MORE/DSP's `helpful.test.json`)."""
    m = re.search(r"\.(train|test|validation|valid|dev|eval)\.", filename)
    if m:
        return m.group(1)
    m = re.match(r"([A-Za-z0-9]+)(?:[-_.])", filename)
    return m.group(1) if m else None


def _dir_files(root: Path, split: str | None, source: str) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise _err(
            source,
            str(root),
            "no data files in this directory",
            f"point path at a file or a directory holding {', '.join(DATA_SUFFIXES)} files",
        )
    split_names = {"train", "test", "validation", "valid", "dev", "eval"}
    named = {_split_of(p.name) for p in files} & split_names
    if split is None:
        if named:
            raise _err(
                source,
                str(root),
                f"the directory holds several splits ({sorted(named)})",
                "pass split=... (e.g. split='train')",
            )
        return files
    chosen = [p for p in files if _split_of(p.name) == split]
    if not chosen:  # split names with an underscore (UltraFeedback's train_prefs-00000-of-00001.parquet)
        chosen = [p for p in files if re.match(re.escape(split) + r"[-.]", p.name)]
    if not chosen:
        raise _err(
            source,
            str(root),
            f"no data file for split {split!r} (files: {[p.name for p in files][:10]})",
            f"use one of the splits present ({sorted(named) or 'none: pass split=None'})",
        )
    return chosen


def _is_saved_dataset(p: Path) -> bool:
    """A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _read_saved(p: Path, split: str | None, source: str) -> Iterator[tuple[dict, str]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise _err(
                source,
                str(p),
                f"a saved DatasetDict with splits {sorted(ds)}; split {split!r} is not one",
                f"pass split= one of {sorted(ds)}",
            )
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield rec, f"{p}, row {i}"


def read_records(path: str, split, name, data_dir, source) -> Iterator[tuple[dict, str]]:
    """Every record of `path` (a file, a hub-layout or `save_to_disk` directory, or a hub id) with its location."""
    p = Path(path).expanduser()
    if p.is_file():
        yield from _read_file(p, source)
        return
    if p.is_dir():
        for sub in (name, data_dir):
            if sub and (p / sub).is_dir():
                p = p / sub
        if _is_saved_dataset(p):
            yield from _read_saved(p, split, source)
            return
        for f in _dir_files(p, split, source):
            yield from _read_file(f, source)
        return
    if is_hub_id(path):
        import datasets

        logger.info("loading hub dataset %s (config %s, split %s)", path, name, split or "train")
        try:
            ds = datasets.load_dataset(path, name, split=split or "train", data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - the hub raises many types
            raise _err(
                source,
                str(path),
                f"not a local path, and loading it from the hub failed ({e})",
                "check the path (relative to the working directory) or the hub id, config and split",
            ) from e
        for i, rec in enumerate(ds):
            yield rec, f"{path}[{split or 'train'}], row {i}"
        return
    raise _err(
        source,
        str(path),
        "no such file or directory (and not a hub id owner/name)",
        "check the path, or give a hub dataset id",
    )
