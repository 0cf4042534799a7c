"""The `calibration:` section of a recipe (`CalibrationConfig`) and the names it resolves: the Averaging RM's
name, the weights dtypes, which sources form the Helpful & Harmless average (`hh_sources`).

Imports the calibration package's pure modules (`metrics`, `compare`) and the `pipeline.scoring` leaf only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.calibration import metrics as M
from pipeline.calibration.compare import parse_comparison
from pipeline.scoring import AUTOCAST
from pipeline.strict import COUNT, COUNT0, Range


# ECE bin counts: at least one bin, at most 10,000 (more bins than test pairs leave most of them empty)
BINS = Range(1, 10_000)


HH_NAMES = ("helpful", "harmless")
AVERAGING = "averaging"
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CalibrationConfig:
    """The `calibration:` section of a recipe."""

    n_bins: list[int] = field(
        default_factory=lambda: [5, 10, 20],
        metadata={
            "range": BINS,
            "help": "Bin counts M for which ECE is reported (ece_<M>); the paper's headline is 10.",
        },
    )
    headline_bins: int = field(
        default=10,
        metadata={
            "range": BINS,
            "help": "M used for ACE/MCE, bootstrap intervals, tables, plots and the diversity matrix.",
        },
    )
    strategy: str = field(
        default="uniform", metadata={"help": "Bins: uniform (equal width, the paper's) or quantile."}
    )
    bootstrap_samples: int = field(
        default=1000,
        metadata={"range": COUNT0, "help": "Bootstrap resamples for 95% intervals of accuracy and ECE (0 = none)."},
    )
    batch_size: int = field(
        default=64,
        metadata={"range": COUNT, "help": "Sequences per scoring forward pass (a packed pair counts as 2)."},
    )
    max_tokens_per_batch: int | None = field(
        default=4096,
        metadata={
            "range": COUNT,
            "help": "Cap on sequences * padded length per forward (long batches shrink); "
            "null = no cap. 4096 measured fastest on a 2-core CPU (scripts/bench_scoring.py); "
            "raise it on GPUs.",
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per sequence after LEFT truncation; null = the data config's max_length."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Autocast dtype for scoring: auto (bf16 where supported), bf16, fp16 or fp32 (no autocast)."
        },
    )
    load_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype when loading: auto (bfloat16 on a CUDA device that supports it, else "
            "float32), float32, bfloat16 or float16."
        },
    )
    bits: int | None = field(
        default=None,
        metadata={"choices": (4, 8), "help": "Load RMs in 4- or 8-bit (bitsandbytes); null = full precision."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    rms: list[str] | None = field(
        default=None, metadata={"help": "RM names from DIR/reward/index.json to evaluate; null = all."}
    )
    external_rms: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Reward models NOT trained in this run, evaluated like the trained ones: name -> a local "
            "save_pretrained directory (a relative path is taken from the current directory), a hub id, or "
            "a PEFT adapter directory (its base model is read from adapter_config.json). Any scalar-head "
            "(num_labels=1) AutoModelForSequenceClassification. A run with only external_rms needs no reward "
            "stage."
        },
    )
    compare: list[str] | None = field(
        default=None,
        metadata={
            "help": "Paired comparisons '<a> vs <b>' (RM names) with 95% paired bootstrap intervals, written "
            "to comparisons.json; null = 'more vs multitask' when both exist, plus each of them vs 'uniform' "
            "when it exists and 'dpo' (the DPO policy, an implicit RM) vs each of them when it exists; [] = none."
        },
    )
    averaging: bool = field(
        default=True,
        metadata={"help": "Score the Averaging RM (mean reward of the single-source RMs) when >= 2 exist."},
    )
    temperature_scaling: bool = field(
        default=True,
        metadata={"help": "Fit one temperature per RM on the validation splits and report scaled metrics."},
    )
    hh_sources: list[str] | None = field(
        default=None,
        metadata={
            "help": "Sources of the Helpful & Harmless average; null = those named or containing helpful/harmless."
        },
    )
    max_pairs_per_split: int | None = field(
        default=None,
        metadata={
            "range": COUNT,
            "help": "Use at most this many pairs of each test/validation split (first ones); null = all.",
        },
    )
    exclude_train_overlap: bool = field(
        default=True,
        metadata={
            "help": "Leave out every test/validation pair whose prompt an evaluated RM was trained on (read from "
            "the RM's train_prompts.json, which the reward stage writes; RMs without one are not checked), so "
            "no RM is scored on prompts it saw. The counts per RM and source are printed and written to "
            "metrics.json (train_overlap) either way. Synthetic sources are counted, never excluded (their "
            "test pairs are fresh draws over the same small prompt pool by design)."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Write the PNG plots."})
    seed: int | None = field(default=None, metadata={"help": "Bootstrap seed; null = the recipe's seed."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar while scoring."})

    def __post_init__(self):
        self.n_bins = [int(m) for m in ([self.n_bins] if isinstance(self.n_bins, int) else self.n_bins)]
        for m in [*self.n_bins, self.headline_bins]:
            M.check_bins(m, "uniform")
        if self.strategy not in M.STRATEGIES:
            raise ValueError(
                f"calibration.strategy: unknown bin strategy {self.strategy!r}; use one of {', '.join(M.STRATEGIES)}"
            )
        if self.dtype not in AUTOCAST:
            raise ValueError(f"calibration.dtype must be one of {sorted(AUTOCAST)}, got {self.dtype!r}")
        if self.load_dtype not in LOAD_DTYPES:
            raise ValueError(f"calibration.load_dtype must be one of {LOAD_DTYPES}, got {self.load_dtype!r}")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"calibration.bits must be 4, 8 or null, got {self.bits!r}")
        if self.batch_size < 1 or self.bootstrap_samples < 0:
            raise ValueError("calibration.batch_size must be >= 1 and calibration.bootstrap_samples >= 0")
        if self.external_rms is not None:
            if not isinstance(self.external_rms, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.external_rms.items()
            ):
                raise ValueError(
                    "calibration.external_rms must map RM names to paths or hub ids, e.g. "
                    f"{{my-rm: /path/to/rm, hub-rm: owner/name}}; got {self.external_rms!r}"
                )
            bad = [k for k in self.external_rms if not re.fullmatch(r"[\w.+-]+", k)]
            if bad:
                raise ValueError(
                    f"calibration.external_rms: RM names {bad} may only hold letters, digits and . _ + - "
                    "(they are used in file names and in 'a vs b' comparisons)"
                )
            self.external_rms = dict(self.external_rms)
        if self.compare is not None:
            self.compare = [self.compare] if isinstance(self.compare, str) else list(self.compare)
            for text in self.compare:
                parse_comparison(text)


def hh_sources(sources: list[str], cfg: CalibrationConfig) -> list[str]:
    """The sources of the Helpful & Harmless average: `calibration.hh_sources` (each must be a source of the run),
    else the sources whose name contains helpful or harmless."""
    if cfg.hh_sources is not None:
        unknown = [s for s in cfg.hh_sources if s not in sources]
        if unknown:
            raise ValueError(f"calibration.hh_sources: {unknown} are not sources of this run ({sources})")
        return list(cfg.hh_sources)
    return [s for s in sources if any(h in s.lower() for h in HH_NAMES)]
