"""The untrained reference: each trained RM's own starting point (step 0), scored on the same pairs as the RM.

Did an RM learn anything? Its step 0 is the model its training began from: its base model with the reward head
initialised exactly as the reward stage initialised it (`pipeline.reward.stage.load_base_model` with the RM's own
training seed and loading settings: the same call, so the same head weights), with the pad and EOS ids of the
trained RM's config (which TRL's trainer writes into the model's config before training). What the RM was trained
from is read from its `fingerprint.json` (its training seed, the reward section's loading settings, the base
model's identity); the base it names must still be the one it was trained from (`base_model_record` equal to the
recorded one, by content), else the RM gets no reference and the log says why. A LoRA RM's step 0 is its base with
the head: LoRA's B starts at zero, so the adapter adds nothing (tests/test_step0.py compares the parameters with the
trainer's at its first step, LoRA included).

The step 0 is then scored exactly as the trained RMs are: in calibration's weights dtype (`load.resolved_load_dtype`)
with the trained RM's tokenizer, by the same `score_rm`. No reference, each with its reason in the log,
calibration/step0.json and report.md: a QLoRA RM (its start is a quantized base), an RM trained with a
`reward.train.chat_template_path` that TRL clones into the model (new tokens and resized embeddings when training
begins), every RM under `calibration.bits` (the RMs are loaded quantized, the reference is not), and an external RM
(`calibration.external_rms`: where its training began is not known). The Averaging RM's step 0 is the average of
its members' step 0s (one scoring pass: they share their start).

RMs that share a starting point (every RM of one run: the same base, seed, settings and tokenizer) are scored once.
The stage compares each RM with its step 0 ('<rm> vs <rm>@step0' in comparisons.json/md, the same paired bootstrap
as every comparison) and writes calibration/step0.json; the report says when an RM is not significantly more
accurate than its step 0. Cost: one more scoring pass per distinct starting point (one per run) and one paired
comparison per RM; `calibration.step0_reference: false` turns it off.

Imports the leaves, `pipeline.reward.stage`, `pipeline.reward.fingerprint` and `pipeline.reward.config` (how an
RM's start is built and identified), and the calibration package's `compare`, `analysis`, `load` and `config`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from pipeline.calibration.compare import step0_name
from pipeline.calibration.config import AVERAGING
from pipeline.io import read_json


# the reward section's keys that decide how a base model is loaded (pipeline.reward.stage.load_base_model)
LOAD_KEYS = ("dtype", "peft", "trust_remote_code", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
EXTERNAL = "an external RM (calibration.external_rms): where its training began is not known"
QUANTIZED = (
    "calibration.bits loads the RMs quantized and the step-0 reference is built in full precision only "
    "(set calibration.bits: null to get it)"
)


@dataclass
class Start:
    """How one RM's training began: the base it loaded, the loading settings, the seed and the tokenizer."""

    base: str
    seed: int
    load: dict
    tokenizer: str | None  # the tokenizer's sha256 in the RM's fingerprint
    rm_dir: str  # a trained RM starting here (its tokenizer and its config's pad/eos ids)
    rms: list[str] = field(default_factory=list)  # the RMs that start here

    def key(self) -> str:
        return json.dumps([self.base, self.seed, self.load, self.tokenizer], sort_keys=True, default=str)


def _defaults() -> dict:
    from dataclasses import fields

    from pipeline.reward.config import RewardStageConfig

    return {f.name: f.default for f in fields(RewardStageConfig) if f.name in LOAD_KEYS}


def _not_rebuilt(section: dict, train_args: dict) -> str | None:
    """Why an RM trained with these settings gets no step 0, or None."""
    peft = section.get("peft")
    if peft in ("qlora4", "qlora8"):
        return (
            f"a QLoRA RM (reward.peft={peft}): its training began on a quantized base, which calibration does not "
            "load as it loads the RM"
        )
    template = train_args.get("chat_template_path")
    if template and not str(template).endswith((".jinja", ".j2")):
        return (
            f"trained with reward.train.chat_template_path={template}: TRL adds that template's tokens and resizes "
            "the embeddings as training begins, which the reference does not rebuild"
        )
    return None


def start_of(rm_dir: Path, run_dir: Path) -> Start | str:
    """The Start of the RM saved in `rm_dir`, or why there is none (a sentence)."""
    from pipeline.reward.fingerprint import base_model_record
    from pipeline.reward.stage import _resolve_model_path

    inputs = (read_json(Path(rm_dir) / "fingerprint.json") or {}).get("inputs")
    if not isinstance(inputs, dict) or "seed" not in inputs or "base_model" not in inputs:
        return f"no fingerprint.json with its seed and base model in {rm_dir}"
    section, train_args = inputs.get("reward") or {}, inputs.get("train_args") or {}
    if why := _not_rebuilt(section, train_args):
        return why
    named = section.get("model_name_or_path")
    base = _resolve_model_path(named) if named else str(Path(run_dir) / "reward" / ".base")
    if not named and not (Path(base) / "config.json").is_file():
        return f"the tiny base model it was built from ({base}) is gone"
    try:
        current = base_model_record(base)
    except (OSError, ValueError) as e:
        return f"its base model {base} cannot be read ({e})"
    if current != inputs["base_model"]:
        return f"its base model {base} changed since it was trained"
    load = {**_defaults(), **{k: section[k] for k in LOAD_KEYS if k in section}}
    seed = int(train_args.get("seed", inputs["seed"]))  # the Trainer's seed: the one load_base_model was given
    return Start(base=base, seed=seed, load=load, tokenizer=inputs.get("tokenizer_sha256"), rm_dir=str(rm_dir))


def plan_starts(index: dict, external: dict, run_dir: Path, cfg) -> tuple[dict, dict]:
    """({key: Start} with the RMs starting there, {rm: why it has no step 0}) for the RMs of `index` (trained in
    this run) and `external` (none: their start is unknown)."""
    starts: dict = {}
    skipped: dict = {}
    for rm, entry in index.items():
        s = QUANTIZED if cfg.bits else start_of(Path(entry["path"]), run_dir)
        if isinstance(s, str):
            skipped[rm] = s
            continue
        starts.setdefault(s.key(), s).rms.append(rm)
    skipped.update(dict.fromkeys(external, EXTERNAL))
    return starts, skipped


def load_start(start: Start, cfg, device):
    """(model, tokenizer) of a starting point, on `device`, in eval mode: `load_base_model` with the RM's seed and
    loading settings (the reward stage's own call), the trained RM's pad and EOS ids (a LoRA RM has no config of
    its own: its base's, as calibration loads it) and tokenizer, cast to the dtype calibration loads the RMs in."""
    import torch
    from transformers import AutoConfig

    from pipeline.calibration.load import resolved_load_dtype
    from pipeline.models import copy_pad_token_id, load_tokenizer
    from pipeline.reward.stage import load_base_model

    model, _ = load_base_model(SimpleNamespace(**start.load), start.base, seed=start.seed)
    if (Path(start.rm_dir) / "config.json").is_file():  # a LoRA RM has none: it is loaded with its base's config
        remote = bool(start.load.get("trust_remote_code"))
        trained = AutoConfig.from_pretrained(start.rm_dir, trust_remote_code=remote).get_text_config()
        text = model.config.get_text_config()
        for key in ("pad_token_id", "eos_token_id"):
            if getattr(trained, key, None) is not None:
                setattr(text, key, getattr(trained, key))
    model = model.to(getattr(torch, resolved_load_dtype(cfg, device)))
    tok = load_tokenizer(start.rm_dir, trust_remote_code=cfg.trust_remote_code)
    copy_pad_token_id(model, tok, key=f"calibration: the step-0 reference of {', '.join(start.rms)}")
    model = model.to(device)
    model.eval()
    return model, tok


def rewards_by_rm(ev, start_rewards: dict) -> dict:
    """{rm: its step 0's rewards}: each RM with a start gets its start's; the Averaging RM the average of its
    members' (when every member has one)."""
    from pipeline.calibration.analysis import averaging_rewards

    out = {rm: start_rewards[key] for key, s in ev.starts.items() for rm in s.rms}
    if ev.with_averaging and all(m in out for m in ev.singles):
        out[AVERAGING] = averaging_rewards(out, ev.singles)
    return out


def averaging_reason(ev) -> str | None:
    """Why the Averaging RM (when evaluated) has no step 0, or None."""
    if not ev.with_averaging or not ev.starts:
        return None
    missing = [m for m in ev.singles if not any(m in s.rms for s in ev.starts.values())]
    return f"its member(s) {', '.join(missing)} have none" if missing else None


def step0_results(ev, rewards: dict, start_rewards: dict, seconds: float, temperatures: dict, cfg, seed: int):
    """(comparisons, step0.json): each RM against its step 0 ('<rm> vs <rm>@step0', the paired bootstrap of every
    comparison, temperature-scaled too when the RM has a temperature: the step 0's is fitted on the same validation
    pairs), and what step0.json records: per starting point its base, seed, RMs and metrics (before and after
    temperature scaling), the RMs without one and why, and the seconds the scoring took."""
    from pipeline.calibration.analysis import compare_rms, fit_temperatures, rm_metrics, source_metrics

    by_rm = rewards_by_rm(ev, start_rewards)
    t0s = fit_temperatures(by_rm, ev.sources)[0] if temperatures else {}
    refs = {}
    for i, (key, start) in enumerate(ev.starts.items(), 1):
        by_source, t0 = start_rewards[key], t0s.get(start.rms[0])
        metrics = rm_metrics(
            {s: source_metrics(*by_source[s]["test"], ev.data[s]["test"], cfg, t0, seed) for s in ev.sources}, ev.hh
        )
        rms = list(start.rms) + ([AVERAGING] if AVERAGING in by_rm and ev.singles[0] in start.rms else [])
        refs["step0" if len(ev.starts) == 1 else f"step0-{i}"] = {
            "base": start.base,
            "seed": start.seed,
            "rms": rms,
            "temperature": t0,
            "metrics": metrics,
        }
    compared = {}
    for rm, start_by_source in by_rm.items():
        if rm not in rewards:
            continue
        pair = (temperatures[rm], t0s[rm]) if rm in temperatures and rm in t0s else None
        compared[f"{rm} vs {step0_name(rm)}"] = compare_rms(
            rewards[rm], start_by_source, ev.data, ev.sources, ev.hh, cfg, seed, pair
        )
    no_reference = dict(ev.no_start)
    if why := averaging_reason(ev):
        no_reference[AVERAGING] = why
    info = {
        "what": "each RM's untrained starting point: its base model with the reward head initialised as its "
        "training began (same seed), scored on the same pairs; the Averaging RM's is the average of its members'",
        "references": refs,
        "no_reference": no_reference,
        "scoring_seconds": round(seconds, 2),
    }
    return compared, info
