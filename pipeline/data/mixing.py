"""Data configuration, train/validation/test splits per source, and mixing of sources for training.

* `build_splits(cfg)` -> ``{source_name: DatasetDict(train, validation, test)}`` in the declared source
  order. A source that ships a test split (`SourceSpec.test_split`) uses it; a source that ships one
  split is cut into train/validation/test BY PROMPT CONTENT (`split_of_prompt`: the sha256 of the prompt
  read as a number u in [0, 1); test when u < test_fraction, validation when u < test_fraction +
  valid_fraction): all pairs that share a prompt land in the same part (OASST1 and the synthetic benchmark
  have several pairs per prompt), and the same prompt lands in the same part in every run, whatever the
  source's name, its order or the seed (renaming a source cannot move a test prompt into training). The
  fractions hold in expectation. Each part keeps the file's record order. Sizes: train is resampled to
  `n_train_per_source` (see `resample`); validation/test are subsampled to at most
  `n_valid_per_source`/`n_test_per_source` (never duplicated; the pairs with the smallest prompt hashes,
  again by content). The ``source`` column is set to the spec's name. A spec with the option ``group_by``
  becomes one source per group (``<name>/<value>``, see `pipeline.data.sources`), each split and sized on
  its own, in sorted name order. `prompt_hash` is also what an RM's ``train_prompts.json`` records.
  The prompt hashed is the WHOLE prompt: in a multi-turn dialogue (HH-RLHF) the whole context up to the last
  user turn, so dialogues that open with the same question but continue differently may land in different
  parts. The source
  option ``split_by: first_turn`` hashes only the first user turn (`split_key`), so such dialogues share a
  part; the default (``prompt``) keeps every existing split as it was.
* `mix(train_by_source, strategy, n_per_source, per_source_batch, seed)`:
  - ``balanced`` (MORE, and the ``uniform`` baseline): every source resampled to the same size n (see
    `resample`; n defaults to the largest source and is rounded UP to a multiple of per_source_batch),
    each source shuffled, then laid out in blocks of ``K * per_source_batch`` rows: block b holds rows
    ``[b*psb, (b+1)*psb)`` of source 0, then of source 1, ... in the order of `train_by_source`. So every
    consecutive block of K*psb rows (a batch, if the trainer reads the dataset SEQUENTIALLY with that
    batch size) holds exactly psb pairs of every source.
  - ``concat`` (the MultiTask baseline): the same per-source resampling when `n_per_source` is given
    (so both baselines see the same pairs), else every source as is; then one global shuffle.
  A source with a ``conversation`` column (chat data) mixed with text sources: the text rows get ``""``
  there, so both kinds live in one Dataset. Both add an int column ``source_id``: the index of the row's source in the order of `train_by_source`
  (the declared order for `build_splits` output). The column is a `datasets.ClassLabel` whose ``names``
  are that list: ``ds.features["source_id"].names`` (or `source_names(ds)`).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from pipeline.strict import COUNT, Range

from .formats import option_keys
from .sources import FORMATS, PreferenceDataError, load_source
from .synthetic import DEFAULT_SOURCES, SPLITS, SyntheticConfig, synthetic_split


logger = logging.getLogger(__name__)

SCHEMA = ("prompt", "chosen", "rejected", "source")
PROMPT_HASH_CHARS = 16  # hex digits of sha256 kept per prompt (64 bits: no collision in practice)


@dataclass
class SourceSpec:
    """One preference source: where it lives and how to read it."""

    name: str = field(metadata={"help": "Source name (the `source` column, the key in build_splits' output)."})
    format: str = field(
        default="synthetic",
        metadata={"help": "hh-rlhf | oasst1 | webgpt | summarize | shp | more-json | trl | jsonl | synthetic"},
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "File, hub-layout directory or hub id; for format=synthetic the synthetic source (default: name)."
        },
    )
    split: str | None = field(
        default="train", metadata={"help": "Split to train on (None: every file of a directory)."}
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Split to test on; None: cut test_fraction of the train split by prompt."}
    )
    validation_split: str | None = field(
        default=None, metadata={"help": "Split to validate on; None: cut valid_fraction of the train split by prompt."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Hub config name (`name` of load_dataset)."})
    options: dict = field(
        default_factory=dict,
        metadata={
            "keys": option_keys,
            "help": "Format options passed to load_source; every "
            "format takes group_by (+ group_names, keep_groups, drop_groups) to split one dataset "
            "into sources <name>/<value>.",
        },
    )


def _default_sources() -> list:
    return [SourceSpec(name=s, format="synthetic") for s in DEFAULT_SOURCES]


@dataclass
class DataConfig:
    """Which preference sources to train and evaluate on, and how to mix them."""

    sources: list = field(
        default_factory=_default_sources,
        metadata={"help": "List of SourceSpec (or dicts with its fields); default: the five synthetic sources."},
    )
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig,
        metadata={"help": "Knobs of the synthetic benchmark (format=synthetic sources)."},
    )
    n_train_per_source: int | None = field(
        default=None,
        metadata={"range": COUNT, "help": "Resample each source's train split to this size (None: keep)."},
    )
    n_valid_per_source: int | None = field(
        default=None, metadata={"range": COUNT, "help": "At most this many validation pairs per source."}
    )
    n_test_per_source: int | None = field(
        default=None, metadata={"range": COUNT, "help": "At most this many test pairs per source."}
    )
    test_fraction: float = field(
        default=0.1,
        metadata={
            "range": Range(0, 1, hi_open=True),
            "help": "Test fraction cut (by prompt hash) from sources that ship one split.",
        },
    )
    valid_fraction: float = field(
        default=0.05,
        metadata={
            "range": Range(0, 1, hi_open=True),
            "help": "Validation fraction cut (by prompt hash) from sources without one.",
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens per transcript; longer ones lose tokens on the LEFT."}
    )
    per_source_batch: int = field(
        default=4, metadata={"range": COUNT, "help": "Pairs of every source in each balanced batch."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of resampling and mixing (test/validation cuts depend on the prompt only)."}
    )

    def __post_init__(self):
        specs = []
        for i, s in enumerate(self.sources):
            if isinstance(s, dict):
                unknown = set(s) - {f.name for f in fields(SourceSpec)}
                if unknown:
                    raise ValueError(
                        f"data.sources[{i}]: unknown key(s) {sorted(unknown)}; "
                        f"valid: {[f.name for f in fields(SourceSpec)]}"
                    )
                s = SourceSpec(**s)
            if s.format not in FORMATS:
                raise ValueError(
                    f"data.sources[{i}] ({s.name!r}): unknown format {s.format!r}; use one of {', '.join(FORMATS)}"
                )
            specs.append(s)
        self.sources = specs
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: duplicate source names {names}; give every source a unique name")
        if isinstance(self.synthetic, dict):
            self.synthetic = SyntheticConfig(**self.synthetic)
        if (
            not 0 <= self.test_fraction < 1
            or not 0 <= self.valid_fraction < 1
            or self.test_fraction + self.valid_fraction >= 1
        ):
            raise ValueError("data.test_fraction and data.valid_fraction must be in [0, 1) and sum to less than 1")
        if self.per_source_batch < 1:
            raise ValueError("data.per_source_batch must be >= 1")
        if self.n_train_per_source is not None and self.per_source_batch > self.n_train_per_source:
            raise ValueError(
                f"data.per_source_batch = {self.per_source_batch} is larger than data.n_train_per_source = "
                f"{self.n_train_per_source}, the training pairs of every source: a batch takes per_source_batch pairs "
                f"of every source. Fix: set data.per_source_batch <= {self.n_train_per_source}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]


def _rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode()) for k in keys])
    )


def resample_indices(n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices into n_rows rows: without replacement when n <= n_rows; otherwise every row
    floor(n/n_rows) times plus a without-replacement remainder (each row used floor or ceil times,
    the lowest-variance resampling with replacement). Returned shuffled."""
    if n_rows == 0:
        raise ValueError("cannot resample an empty source")
    reps, rem = divmod(n, n_rows)
    idx = np.concatenate([np.tile(np.arange(n_rows), reps), rng.permutation(n_rows)[:rem]])
    return rng.permutation(idx)


def prompt_hash(prompt: str) -> str:
    """The content hash of a prompt: the first 16 hex digits of sha256(prompt as UTF-8). It decides a cut
    source's split (`split_of_prompt`) and is what an RM's `train_prompts.json` records."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:PROMPT_HASH_CHARS]


def split_of_prompt(prompt: str, test_fraction: float, valid_fraction: float) -> str:
    """The part (test / validation / train) a prompt belongs to, from its content alone: u = its hash read as
    a number in [0, 1); test when u < test_fraction, validation when u < test_fraction + valid_fraction, else
    train. The same prompt lands in the same part in every run, whatever the source's name or order and the
    seed; a larger test_fraction only adds prompts to the test part (nested cuts)."""
    u = int(prompt_hash(prompt), 16) / 16**PROMPT_HASH_CHARS
    return "test" if u < test_fraction else ("validation" if u < test_fraction + valid_fraction else "train")


TRAIN_PROMPTS = "train_prompts.json"


def train_prompts_record(prompts) -> dict:
    """What an RM's ``train_prompts.json`` holds: the sorted unique `prompt_hash` of every prompt it was
    trained on (16 hex digits each, about 19 bytes per prompt in the file)."""
    return {
        "hash": f"sha256(prompt as UTF-8), first {PROMPT_HASH_CHARS} hex digits (pipeline.data.mixing.prompt_hash)",
        "n_prompts": len(hashes := sorted({prompt_hash(p) for p in prompts})),
        "prompts": hashes,
    }


def read_train_prompts(rm_dir) -> set[str] | None:
    """The prompt hashes in ``<rm_dir>/train_prompts.json``; None when the RM has no such record (a hub id, or
    an RM trained elsewhere). A record that does not parse is an error naming the file."""
    import json
    from pathlib import Path

    path = Path(rm_dir) / TRAIN_PROMPTS
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        hashes = rec["prompts"]
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            raise TypeError("'prompts' is not a list of strings")
    except (ValueError, KeyError, TypeError) as e:
        raise PreferenceDataError(
            f"{path}: not a readable training-prompt record ({type(e).__name__}: {e}). Fix: delete it (the RM's "
            "overlap with the evaluation data is then not checked) or restore it"
        ) from None
    return set(hashes)


NOT_DROPPED = frozenset(
    {"format", "path", "split", "records", "pairs", "groups", "dropped_groups", "trees", "context_mismatch_common"}
)


def data_stats(splits: dict) -> dict:
    """Per source of `build_splits` output: pairs per part, what each load read (`load_stats`: records, pairs,
    every reason for dropping) and the dropped counts summed over those loads."""
    from .sources import load_stats

    out = {}
    for source, dd in splits.items():
        loads = []
        for d in dd.values():
            st = load_stats(d)
            if st and st not in loads:
                loads.append(st)
        dropped: dict = {}
        for st in loads:
            for k, v in st.items():
                if k not in NOT_DROPPED and isinstance(v, int) and v:
                    dropped[k] = dropped.get(k, 0) + v
        out[source] = {"pairs": {k: len(d) for k, d in dd.items()}, "loaded": loads, "dropped": dropped}
    return out


def describe_data_stats(stats: dict) -> list[str]:
    """One log line per source: its pairs per part and what was dropped on loading."""
    lines = []
    for source, st in stats.items():
        parts = "/".join(str(st["pairs"].get(k, 0)) for k in SPLITS)
        read = sum(x.get("records", 0) for x in st["loaded"])
        drop = ", ".join(f"{k} {v}" for k, v in sorted(st["dropped"].items())) or "none"
        lines.append(
            f"{source}: train/validation/test = {parts} pairs"
            + (f"; {read} records read, dropped: {drop}" if st["loaded"] else "")
            + _dropped_groups(st["loaded"])
        )
    return lines


def _dropped_groups(loads: list[dict], shown: int = 6) -> str:
    """'; groups dropped: by drop_groups 76 pairs (tifu 76); not in keep_groups 280 pairs (relationship_advice
    72, ... +12 more)': every group the source's loads dropped, by name and pairs, the largest first, per reason
    (drop_groups, not in keep_groups, no train pairs: only in a declared test/validation split)."""
    by_why: dict = {}
    for st in loads:
        for g, rec in (st.get("dropped_groups") or {}).items():
            named = by_why.setdefault(rec.get("why", "?"), {})
            named[g] = named.get(g, 0) + int(rec.get("pairs", 0))
    parts = []
    for why, named in sorted(by_why.items()):
        items = sorted(named.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{g} {n}" for g, n in items[:shown])
        more = f" +{len(items) - shown} more" if len(items) > shown else ""
        label = "by drop_groups" if why == "drop_groups" else why
        parts.append(f"{label} {sum(named.values())} pairs ({text}{more})")
    return f"; groups dropped: {'; '.join(parts)}" if parts else ""


SPLIT_BY = ("prompt", "first_turn")


def first_turn(prompt: str) -> str:
    """The prompt up to the end of its first user turn: for the HH layout ('\n\nHuman: q\n\nAssistant: a\n\nHuman:
    ...'), everything before the first '\n\nAssistant:' after 'Human:'; a prompt without that layout whole."""
    start = prompt.find("Human:")
    end = prompt.find("\n\nAssistant:", start) if start >= 0 else -1
    return prompt[:end] if end >= 0 else prompt


def split_key(prompt: str, split_by: str = "prompt") -> str:
    """What a cut source's split is decided by (`split_of_prompt` hashes it): the whole prompt (the default: for
    a multi-turn dialogue its whole context), or with `split_by: first_turn` its first user turn only, so the
    dialogues that open with the same question share a part whatever their later turns."""
    return first_turn(prompt) if split_by == "first_turn" else prompt


def _split_by_prompt(ds, test_fraction: float, valid_fraction: float, split_by: str = "prompt"):
    """test/validation/train of one source by the content hash of each pair's prompt (`split_of_prompt`; of its
    first user turn with split_by=first_turn), so all pairs of one prompt share a part. A source of >= 3 prompts
    whose hashes give an asked-for part no prompt moves the train prompt with the smallest hash there (tiny
    sources only; still content-based)."""
    prompts = [split_key(p, split_by) for p in ds["prompt"]]
    uniq = list(dict.fromkeys(prompts))
    part = {p: split_of_prompt(p, test_fraction, valid_fraction) for p in uniq}
    if len(uniq) >= 3:
        for k, f in (("test", test_fraction), ("validation", valid_fraction)):
            train = sorted((prompt_hash(p), p) for p in uniq if part[p] == "train")
            if f > 0 and k not in part.values() and len(train) > 1:
                part[train[0][1]] = k
    idx = {k: [i for i, p in enumerate(prompts) if part[p] == k] for k in SPLITS}
    return {k: ds.select(v) for k, v in idx.items()}


def _load_spec(spec: SourceSpec, split: str | None):
    options = {k: v for k, v in spec.options.items() if k != "split_by"}  # the split's option, not the loader's
    return load_source(
        spec.format, spec.path or spec.name, split=split, name=spec.config_name, source=spec.name, **options
    )


def _split_by_option(spec: SourceSpec) -> str:
    """The source's `options.split_by` (default: prompt); anything else is an error naming the source."""
    value = spec.options.get("split_by", "prompt")
    if value not in SPLIT_BY:
        raise PreferenceDataError(
            f"[source {spec.name!r}] options.split_by={value!r} is not one of {', '.join(SPLIT_BY)}. Fix: use prompt "
            "(the whole prompt decides the split, the default) or first_turn (its first user turn does)"
        )
    return value


def build_splits(cfg: DataConfig) -> dict:
    """{source_name: DatasetDict(train, validation, test)} (see the module docstring)."""

    out = {}
    for spec in cfg.sources:
        rng = _rng(cfg.seed, "split", spec.name)
        if spec.format == "synthetic":
            syn_name = spec.path or spec.name
            if spec.options:
                raise PreferenceDataError(
                    f"[source {spec.name!r}] options {sorted(spec.options)} are not used by "
                    "synthetic sources. Fix: set the knobs in data.synthetic instead"
                )
            scfg = cfg.synthetic
            if syn_name not in scfg.sources:
                raise PreferenceDataError(
                    f"[source {spec.name!r}] unknown synthetic source {syn_name!r}. "
                    f"Fix: use one of {list(scfg.sources)} as its path"
                )
            sizes = {
                "train": cfg.n_train_per_source or scfg.n_train,
                "validation": cfg.n_valid_per_source or scfg.n_valid,
                "test": cfg.n_test_per_source or scfg.n_test,
            }
            parts = {k: synthetic_split(scfg, syn_name, k, sizes[k]) for k in SPLITS}
        else:
            train = _load_spec(spec, spec.split)
            test = _load_spec(spec, spec.test_split) if spec.test_split else None
            valid = _load_spec(spec, spec.validation_split) if spec.validation_split else None
            by = _split_by_option(spec)
            if spec.options.get("group_by"):  # one dataset, several sources <name>/<value>
                _count_groups_without_train(train, test, valid)
                for g in sorted(set(train["source"])):
                    if g in out or g in cfg.source_names:
                        raise PreferenceDataError(
                            f"[source {spec.name!r}] group source {g!r} clashes with another "
                            "source's name. Fix: rename one (group_names or the source name)"
                        )
                    groups = (_group_of(d, g) for d in (train, test, valid))
                    out[g] = _finish(_source_parts(cfg, g, *groups, split_by=by), g)
                continue
            parts = _source_parts(cfg, spec.name, train, test, valid, rng, split_by=by)
        out[spec.name] = _finish(parts, spec.name)
    return out


def _count_groups_without_train(train, test, valid) -> None:
    """Groups of a declared test/validation split that have no train pairs become no source: count their pairs
    in that split's load stats (``no_train_group``, and by group under ``dropped_groups``), so the data line
    names them instead of losing them without a word."""
    import json
    from collections import Counter

    from .sources import STATS_PREFIX, load_stats

    have = set(train["source"])
    for d in (test, valid):
        orphans = Counter(g for g in d["source"] if g not in have) if d is not None else None
        if not orphans:
            continue
        stats = load_stats(d)
        stats["no_train_group"] = sum(orphans.values())
        named = stats.setdefault("dropped_groups", {})
        for g, n in sorted(orphans.items()):
            named[g] = {"pairs": n, "why": "no train pairs"}
        d.info.description = STATS_PREFIX + json.dumps(stats, sort_keys=True)


def _group_of(ds, name: str):
    """The rows of one group (a `group_by` source) of a loaded dataset; None stays None."""
    if ds is None:
        return None
    idx = [i for i, s in enumerate(ds["source"]) if s == name]
    if not idx:
        raise PreferenceDataError(
            f"[source {name!r}] has pairs in the train split but none in a declared test/"
            "validation split. Fix: drop that group (drop_groups) or let the split be cut "
            "from train (test_split/validation_split: null)"
        )
    return ds.select(idx)


def _source_parts(cfg, name: str, train, test=None, valid=None, rng=None, split_by: str = "prompt") -> dict:
    """train/validation/test of one loaded source: declared splits, or cut from train by prompt; sized."""
    rng = rng if rng is not None else _rng(cfg.seed, "split", name)
    cut = _split_by_prompt(
        train,
        0.0 if test is not None else cfg.test_fraction,
        0.0 if valid is not None else cfg.valid_fraction,
        split_by,
    )
    parts = {
        "train": cut["train"],
        "validation": valid if valid is not None else cut["validation"],
        "test": test if test is not None else cut["test"],
    }
    if cfg.n_train_per_source:
        idx = resample_indices(len(parts["train"]), cfg.n_train_per_source, rng)
        parts["train"] = parts["train"].select(np.sort(idx) if cfg.n_train_per_source <= len(parts["train"]) else idx)
    for k, n in (("validation", cfg.n_valid_per_source), ("test", cfg.n_test_per_source)):
        if n is not None and len(parts[k]) > n:  # by content too: the same pairs whatever the name or seed
            keys = [(prompt_hash(p), i) for i, p in enumerate(parts[k]["prompt"])]
            parts[k] = parts[k].select(sorted(i for _, i in sorted(keys)[:n]))
    return parts


def _finish(parts: dict, name: str):
    import datasets

    for k, d in parts.items():
        if len(d) and set(d["source"]) != {name}:
            d = d.map(lambda _: {"source": name})
        parts[k] = d
    if len(parts["train"]) == 0:
        raise PreferenceDataError(f"[source {name!r}] the train split is empty. Fix: check the data")
    logger.info("[%s] train/validation/test = %s", name, {k: len(v) for k, v in parts.items()})
    return datasets.DatasetDict(parts)


def mix(
    train_by_source: dict,
    strategy: str = "balanced",
    *,
    n_per_source: int | None = None,
    per_source_batch: int = 1,
    seed: int = 0,
):
    """Mix per-source datasets into one training set with an int `source_id` (see the module docstring)."""
    import datasets

    if strategy not in ("balanced", "concat"):
        raise ValueError(f"unknown mixing strategy {strategy!r}: use 'balanced' or 'concat'")
    if not train_by_source:
        raise ValueError("mix() needs at least one source")
    names = list(train_by_source)
    for s, d in train_by_source.items():
        if len(d) == 0:
            raise PreferenceDataError(f"[source {s!r}] empty training set. Fix: check the data")
    if any("conversation" in d.column_names for d in train_by_source.values()):  # text and conversational rows
        train_by_source = {
            s: d if "conversation" in d.column_names else d.add_column("conversation", [""] * len(d))
            for s, d in train_by_source.items()
        }
    common = [
        c
        for c in train_by_source[names[0]].column_names
        if all(c in d.column_names for d in train_by_source.values()) and c != "source_id"
    ]
    for c in SCHEMA:
        if c not in common:
            raise PreferenceDataError(f"mix(): column {c!r} missing from some source. Fix: load with load_source")
    dropped = {c for d in train_by_source.values() for c in d.column_names} - set(common) - {"source_id"}
    if dropped:
        logger.info("mix(): dropping columns not present in every source: %s", sorted(dropped))
    psb = int(per_source_batch)
    n = n_per_source
    if strategy == "balanced":
        n = n or max(len(d) for d in train_by_source.values())
        n = -(-n // psb) * psb
    parts, picks, offset = [], [], 0
    for s in names:
        d = train_by_source[s].select_columns(common)
        idx = resample_indices(len(d), n, _rng(seed, "mix", s)) if n is not None else np.arange(len(d))
        parts.append(d)
        picks.append(offset + idx)
        offset += len(d)
    if strategy == "balanced":
        # picks[k] has n rows; block b holds picks[k][b*psb:(b+1)*psb] for k = 0..K-1.
        order = np.stack([p.reshape(n // psb, psb) for p in picks], axis=1).reshape(-1)
        sid = np.tile(np.repeat(np.arange(len(names)), psb), n // psb)
    else:
        allp = np.concatenate(picks)
        allk = np.concatenate([np.full(len(p), k) for k, p in enumerate(picks)])
        perm = _rng(seed, "concat").permutation(len(allp))
        order, sid = allp[perm], allk[perm]
    with _quiet_datasets():
        mixed = datasets.concatenate_datasets(parts).select(order).flatten_indices()
        return mixed.add_column("source_id", sid.tolist(), feature=datasets.ClassLabel(names=names))


class _quiet_datasets:
    """Silence datasets' progress bars for the small internal rewrites (restores the previous state)."""

    def __enter__(self):
        import datasets

        self.was_disabled = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if not self.was_disabled:
            datasets.enable_progress_bars()


def source_names(ds) -> list[str]:
    """The source list that `source_id` indexes into."""
    return list(ds.features["source_id"].names)
