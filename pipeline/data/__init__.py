"""Preference data: one schema for every source, loaders, splits, mixing and left-truncating tokenization.

Schema: string columns `prompt`, `chosen`, `rejected`, `source` (optional float `margin`); `prompt` ends
with the final assistant marker, so `prompt + chosen` is the full chosen transcript. The synthetic
benchmark adds `true_prob` and `gold_prob` (see `pipeline.data.synthetic`). Conversational rows (format
`trl`) add the string column `conversation` (their messages as JSON; `""` for text rows) and hold the plain
HH rendering in prompt/chosen/rejected; `pipeline.data.render` turns a row into text for a tokenizer (its
chat template, or the plain layout).

    from pipeline.data import DataConfig, build_splits, mix, tokenize_pairs
    splits = build_splits(DataConfig())                       # the five synthetic sources
    train = mix({s: d["train"] for s, d in splits.items()}, "balanced", per_source_batch=4)
    tok_train, n_cut = tokenize_pairs(train, tokenizer, max_length=512)

Modules: `sources` (load_source and the shared helpers), `read` (files, directories, hub ids), `formats`
(the format table and the loaders), `synthetic` (the ground-truth benchmark), `mixing`
(DataConfig, SourceSpec, build_splits, mix), `render` (chat templates / plain layout), `tokenize`
(encode_left, encode_pairs, pad_right, tokenize_pairs).
"""

from .formats.base import PreferenceDataError, split_dialogue
from .mixing import DataConfig, SourceSpec, build_splits, mix, prompt_hash, resample_indices, source_names
from .sources import FORMATS, load_source, load_stats
from .synthetic import (
    SyntheticConfig,
    gold_reward,
    source_utility,
    synthetic_corpus,
    synthetic_prompts,
    synthetic_responses,
    synthetic_splits,
)
from .tokenize import encode_left, pad_right, tokenize_pairs


__all__ = [
    "DataConfig",
    "FORMATS",
    "PreferenceDataError",
    "SourceSpec",
    "SyntheticConfig",
    "build_splits",
    "encode_left",
    "gold_reward",
    "load_source",
    "load_stats",
    "mix",
    "prompt_hash",
    "pad_right",
    "resample_indices",
    "source_names",
    "source_utility",
    "split_dialogue",
    "synthetic_corpus",
    "synthetic_prompts",
    "synthetic_responses",
    "synthetic_splits",
    "tokenize_pairs",
]
