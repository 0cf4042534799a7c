"""The `calibration:` section of a recipe (`CalibrationConfig`) and the names it resolves: the Averaging RM's
name, the weights dtypes, which sources form the Helpful & Harmless average (`hh_sources`).

Imports the calibration package's pure modules (`metrics`, `compare`) and the `pipeline.scoring` leaf only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from pipeline.calibration import metrics as M
from pipeline.calibration.compare import parse_comparison
from pipeline.scoring import AUTOCAST
from pipeline.strict import COUNT, COUNT0, POSITIVE, Range


# ECE bin counts: at least one bin, at most 10,000 (more bins than test pairs leave most of them empty)
BINS = Range(1, 10_000)


@dataclass
class ImplicitRMSpec:
    """One entry of `calibration.implicit_rms`: a DPO policy read as a reward model (`pipeline.implicit`)."""

    policy: str | None = field(
        default=None,
        metadata={
            "help": "The DPO-trained policy: a save_pretrained directory of a causal LM with its tokenizer (its "
            "chat template renders conversational rows), a hub id, or a CAUSAL_LM PEFT adapter directory. Required."
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "The reference model the policy was trained against (directory or hub id; same vocabulary). "
            "Required unless reference_free is true."
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "range": POSITIVE,
            "help": "The DPO beta the policy was trained with: reward = beta * (sum log pi - sum log pi_ref) over "
            "the response tokens. Required. Temperature scaling fits it (effective beta = beta / T, reported).",
        },
    )
    reference_free: bool = field(
        default=False,
        metadata={
            "help": "Score beta * sum log pi alone, without a reference (must be asked for explicitly; the report "
            "states it)."
        },
    )


def implicit_key_rows() -> list[tuple[str, str, str, str]]:
    """`--show-keys` rows of one `calibration.implicit_rms.<name>` entry."""
    kinds = {"policy": ("str", "required"), "reference": ("str", "null"), "beta": ("float", "required")}
    rows = []
    for f in fields(ImplicitRMSpec):
        text = f.metadata.get("help", "")
        if f.metadata.get("range") is not None:
            text += f" Allowed: {f.metadata['range']}."
        rows.append((f"<name>.{f.name}", *kinds.get(f.name, ("bool", "false")), text))
    return rows


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
    implicit_rms: dict[str, ImplicitRMSpec] | None = field(
        default=None,
        metadata={
            "keys": implicit_key_rows,
            "help": "DPO policies evaluated as implicit reward models beside the others: name -> {policy, reference, "
            "beta, reference_free}. Reward of a response = beta * (sum of the policy's minus the reference's "
            "log-probabilities of its tokens), response tokens only (an EOS appended to text responses, as TRL's "
            "DPOTrainer does), the policy's tokenizer and chat template. Sequences over max_length are cut from "
            "the LEFT like the RMs' input (TRL's default keeps the start instead). Scored with the policy, then "
            "the reference (one model in memory at a time), without autocast (calibration.dtype and bits do not "
            "apply; weights in load_dtype).",
        },
    )
    compare: list[str] | None = field(
        default=None,
        metadata={
            "help": "Paired comparisons '<a> vs <b>' (RM names) with 95% paired bootstrap intervals, written "
            "to comparisons.json; null = 'more vs multitask' when both exist, plus each of them vs 'uniform' "
            "when it exists, plus each implicit RM (implicit_rms) vs 'more' and vs 'multitask' when they exist; "
            "[] = none."
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
        self.implicit_rms = check_implicit_rms(self.implicit_rms, self.external_rms or {})
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


def check_implicit_rms(value, external: dict) -> dict[str, ImplicitRMSpec] | None:
    """`calibration.implicit_rms` as {name: ImplicitRMSpec} (plain dicts converted), each entry checked: a name
    usable in file names and comparisons, not an external RM's, a policy, beta > 0, and a reference unless
    reference_free (one ValueError naming the key and the fix)."""
    from pipeline.implicit import check_spec

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            "calibration.implicit_rms must map names to {policy, reference, beta}, e.g. "
            f"{{dpo: {{policy: runs/x/dpo, reference: runs/x/sft, beta: 0.1}}}}; got {value!r}"
        )
    out = {}
    for name, spec in value.items():
        key = f"calibration.implicit_rms.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(
                f"calibration.implicit_rms: the name {name!r} may only hold letters, digits and . _ + - (it is used "
                "in file names and in 'a vs b' comparisons)"
            )
        if name in external or name == AVERAGING:
            raise ValueError(f"{key}: the name {name!r} is already used by an external RM or the Averaging RM")
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {f.name for f in fields(ImplicitRMSpec)})
            if unknown:
                raise ValueError(f"{key}: unknown keys {unknown}; valid: policy, reference, beta, reference_free")
            spec = ImplicitRMSpec(**spec)
        if not isinstance(spec, ImplicitRMSpec):
            raise ValueError(f"{key} must be a mapping {{policy, reference, beta, reference_free}}, got {spec!r}")
        check_spec(
            {
                "policy": spec.policy,
                "reference": spec.reference,
                "beta": spec.beta,
                "reference_free": spec.reference_free,
            },
            key,
        )
        out[name] = spec
    return out
