"""Data configuration, train/validation/test splits per source, and mixing of sources for training.

* `build_splits(cfg)` -> ``{source_name: DatasetDict(train, validation, test)}`` in the declared source
  order. A source that ships a test split (`SourceSpec.test_split`) uses it; a source that ships one
  split is cut deterministically (seeded by ``(cfg.seed, source name)``) into train/validation/test BY
  PROMPT: all pairs that share a prompt land in the same part (OASST1 and the synthetic benchmark have
  several pairs per prompt; splitting pairs independently would leak test prompts into training). Each
  part keeps the file's record order. Sizes: train is resampled to `n_train_per_source` (see `resample`);
  validation/test are subsampled to at most `n_valid_per_source`/`n_test_per_source` (never duplicated).
  The ``source`` column is set to the spec's name. A spec with the option ``group_by`` becomes one source
  per group (``<name>/<value>``, see `pipeline.data.sources`), each split and sized on its own, in sorted
  name order.
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

import logging
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .sources import FORMATS, PreferenceDataError, load_source
from .synthetic import DEFAULT_SOURCES, SPLITS, SyntheticConfig, synthetic_split


logger = logging.getLogger(__name__)

SCHEMA = ("prompt", "chosen", "rejected", "source")


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
            "keys": "pipeline.data.sources:option_keys",
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
        default=None, metadata={"help": "Resample each source's train split to this size (None: keep)."}
    )
    n_valid_per_source: int | None = field(
        default=None, metadata={"help": "At most this many validation pairs per source."}
    )
    n_test_per_source: int | None = field(default=None, metadata={"help": "At most this many test pairs per source."})
    test_fraction: float = field(default=0.1, metadata={"help": "Test fraction cut from sources that ship one split."})
    valid_fraction: float = field(default=0.05, metadata={"help": "Validation fraction cut from sources without one."})
    max_length: int = field(
        default=512, metadata={"help": "Tokens per transcript; longer ones lose tokens on the LEFT."}
    )
    mixing: str = field(
        default="balanced", metadata={"help": "balanced (same size, per-source-balanced batches) | concat"}
    )
    per_source_batch: int = field(default=4, metadata={"help": "Pairs of every source in each balanced batch."})
    seed: int = field(default=0, metadata={"help": "Seed of splitting, resampling and mixing."})

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
        if self.mixing not in ("balanced", "concat"):
            raise ValueError(f"data.mixing must be 'balanced' or 'concat', got {self.mixing!r}")
        if (
            not 0 <= self.test_fraction < 1
            or not 0 <= self.valid_fraction < 1
            or self.test_fraction + self.valid_fraction >= 1
        ):
            raise ValueError("data.test_fraction and data.valid_fraction must be in [0, 1) and sum to less than 1")
        if self.per_source_batch < 1:
            raise ValueError("data.per_source_batch must be >= 1")

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


def _split_by_prompt(ds, test_fraction: float, valid_fraction: float, rng):
    prompts = ds["prompt"]
    uniq = list(dict.fromkeys(prompts))
    order = rng.permutation(len(uniq))
    n_test = int(round(test_fraction * len(uniq)))
    n_valid = int(round(valid_fraction * len(uniq)))
    if len(uniq) >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_valid = max(n_valid, 1) if valid_fraction > 0 else 0
    part = {}
    for rank, u in enumerate(order):
        part[uniq[u]] = "test" if rank < n_test else ("validation" if rank < n_test + n_valid else "train")
    idx = {k: [i for i, p in enumerate(prompts) if part[p] == k] for k in SPLITS}
    return {k: ds.select(v) for k, v in idx.items()}


def _load_spec(spec: SourceSpec, split: str | None):
    return load_source(
        spec.format, spec.path or spec.name, split=split, name=spec.config_name, source=spec.name, **spec.options
    )


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
            if spec.options.get("group_by"):  # one dataset, several sources <name>/<value>
                for g in sorted(set(train["source"])):
                    if g in out or g in cfg.source_names:
                        raise PreferenceDataError(
                            f"[source {spec.name!r}] group source {g!r} clashes with another "
                            "source's name. Fix: rename one (group_names or the source name)"
                        )
                    out[g] = _finish(_source_parts(cfg, g, *(_group_of(d, g) for d in (train, test, valid))), g)
                continue
            parts = _source_parts(cfg, spec.name, train, test, valid, rng)
        out[spec.name] = _finish(parts, spec.name)
    return out


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


def _source_parts(cfg, name: str, train, test=None, valid=None, rng=None) -> dict:
    """train/validation/test of one loaded source: declared splits, or cut from train by prompt; sized."""
    rng = rng if rng is not None else _rng(cfg.seed, "split", name)
    cut = _split_by_prompt(
        train, 0.0 if test is not None else cfg.test_fraction, 0.0 if valid is not None else cfg.valid_fraction, rng
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
        if n is not None and len(parts[k]) > n:
            parts[k] = parts[k].select(np.sort(rng.permutation(len(parts[k]))[:n]))
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
