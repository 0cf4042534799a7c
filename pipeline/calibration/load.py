"""Which reward models the calibration stage evaluates, and loading each of them.

`read_rms` lists the RMs: those of `DIR/reward/index.json` (trained in this run) and `calibration.external_rms`
(`external_entries`: RMs trained elsewhere, a save_pretrained directory, a hub id or a SEQ_CLS PEFT adapter; with
only those, no reward stage is needed). `load_rm` loads one on a device, after `check_external_rm` has made sure
an external one is a scalar-head sequence classifier (an adapter's tokenizer may come from its base model); an
RM without a pad id whose tokenizer pads with EOS gets a warning (`warn_eos_padding`: its reward is read at the
token before the appended EOS).

Imports the leaves (`pipeline.io`, `layout`, `logs`, `models`), `pipeline.reward.index` and the calibration config.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.calibration.config import AVERAGING, CalibrationConfig
from pipeline.io import is_hub_id
from pipeline.layout import find_reward_head
from pipeline.logs import say
from pipeline.reward.index import read_index


def read_rms(run_dir: Path, cfg: CalibrationConfig) -> tuple[dict, dict]:
    """(trained, external): the entries of DIR/reward/index.json named by `calibration.rms` (all when null) and
    `external_entries`. A run that only evaluates external RMs needs no index."""
    trained_needed = cfg.rms is not None or not (cfg.external_rms or cfg.implicit_rms)
    if trained_needed and not (run_dir / "reward" / "index.json").is_file():
        raise FileNotFoundError(
            f"calibration: {run_dir / 'reward' / 'index.json'} not found; run the reward stage first "
            "(python -m pipeline.reward), or name reward models trained elsewhere in calibration.external_rms "
            "(see the rm-eval recipe) or DPO policies in calibration.implicit_rms"
        )
    index = (
        read_index(run_dir, cfg.rms, key="calibration.rms")
        if trained_needed or (run_dir / "reward" / "index.json").is_file()
        else {}
    )
    external = external_entries(cfg, list(index))
    for name, entry in external.items():  # before any work: what the model is, then its tokenizer files
        check_external_rm(name, entry["path"], cfg.trust_remote_code)
    check_external_tokenizers(cfg)
    return index, external


SUPPORTED_RMS = (
    "Supported: a scalar-head sequence classifier, i.e. a checkpoint that AutoModelForSequenceClassification loads "
    "with num_labels=1 (config.json architectures ending in 'ForSequenceClassification'), given as a local "
    "save_pretrained directory or a hub id, or a PEFT adapter directory (task_type SEQ_CLS) on such a model."
)


def external_entries(cfg: CalibrationConfig, taken: list[str]) -> dict:
    """calibration.external_rms as index-like entries ({"path", "method": "external", "external": True, ...})."""
    out = {}
    for name, spec in (cfg.external_rms or {}).items():
        if name in taken or name == AVERAGING:
            used_by = "the Averaging RM" if name == AVERAGING else "a reward model trained in this run"
            raise ValueError(f"calibration.external_rms: the name {name!r} is already used by {used_by}; pick another")
        local = Path(spec).expanduser()
        if local.exists():
            if not local.is_dir():
                raise FileNotFoundError(
                    f"calibration.external_rms.{name}: {spec} is a file; give the directory save_pretrained wrote "
                    "(config.json + weights + tokenizer), a PEFT adapter directory or a hub id"
                )
            path = str(local.resolve())
        elif is_hub_id(spec):
            path = spec
        else:
            raise FileNotFoundError(
                f"calibration.external_rms.{name}: {spec} is neither an existing directory nor a hub id (owner/name); "
                "fix the path"
            )
        out[name] = {"path": path, "method": "external", "sources": [], "external": True}
    return out


def tokenizer_dir(path: str) -> str:
    """Where an RM's tokenizer is loaded from: its own directory, or a PEFT adapter's base model when the adapter
    directory has no tokenizer files."""
    from pipeline.models import has_tokenizer_files

    local = Path(path).expanduser()
    adapter = local / "adapter_config.json"
    if not adapter.is_file() or has_tokenizer_files(local):
        return path
    try:
        return json.loads(adapter.read_text()).get("base_model_name_or_path") or path
    except (OSError, ValueError, AttributeError):
        return path  # check_external_rm names the problem


def check_external_tokenizers(cfg: CalibrationConfig) -> None:
    """Before any work: every local external RM (or, for an adapter without its own tokenizer, its local base)
    holds tokenizer files (one `ModelLoadError` naming the key, the folder and the missing files otherwise) and
    the chat template they ship renders (one ValueError naming it, `check_tokenizer_templates`)."""
    from pipeline.data.render import check_tokenizer_templates
    from pipeline.models import check_tokenizer_files, saved_chat_templates

    for name, spec in (cfg.external_rms or {}).items():
        local = Path(spec).expanduser()
        if local.is_dir():
            tok_dir = tokenizer_dir(str(local))
            check_tokenizer_files(tok_dir, key=f"calibration.external_rms.{name}")
            check_tokenizer_templates(saved_chat_templates(tok_dir), f"calibration.external_rms.{name} ({tok_dir})")


def check_external_rm(name: str, path: str, trust_remote_code: bool) -> str | None:
    """Fail clearly unless `path` is a scalar-head sequence classifier (or a SEQ_CLS adapter on one).

    Returns the directory/hub id to load the tokenizer from (an adapter without its own tokenizer: its base).
    """
    from transformers import AutoConfig

    def fail(problem: str):
        return ValueError(f"calibration: external reward model {name!r} ({path}): {problem}. {SUPPORTED_RMS}")

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        try:
            acfg = json.loads(adapter.read_text())
        except json.JSONDecodeError as e:
            raise fail(f"adapter_config.json is not valid JSON ({e})") from e
        if acfg.get("task_type") != "SEQ_CLS":
            raise fail(
                f"it is a PEFT adapter with task_type {acfg.get('task_type')!r}, not SEQ_CLS (sequence classification)"
            )
        base = acfg.get("base_model_name_or_path")
        if not base:
            raise fail("its adapter_config.json has no base_model_name_or_path")
        return tokenizer_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one clear message whatever broke inside transformers
        from pipeline.models import ModelLoadError, check_model_source, hub_error

        key = f"calibration.external_rms.{name}"
        check_model_source(path, key=key)  # the precise reason, when it is one: no config.json, invalid JSON, ...
        if not Path(path).is_dir():
            raise hub_error(path, key, e) from None
        raise ModelLoadError(
            f"calibration: external reward model {name!r} at {path}: its config does not load "
            f"({type(e).__name__}: {e}). {SUPPORTED_RMS}"
        ) from e
    # a transformers config, not a dataclass: a config.json may leave `architectures` out (or null)
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise fail(
            "its config.json names no architecture, so it cannot be told from a language model whose "
            'reward head would be randomly initialised (add e.g. "architectures": '
            '["LlamaForSequenceClassification"] if it is a sequence classifier)'
        )
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise fail(
            f"it is a {', '.join(archs)} checkpoint, not a sequence classifier (loading it as one would "
            "give a randomly initialised reward head)"
        )
    if getattr(config, "num_labels", 1) != 1:  # a custom (remote-code) config class may not define it
        raise fail(f"its head has num_labels={config.num_labels} outputs, not a single scalar reward")
    return path


def load_rm(name: str, entry: dict, cfg: CalibrationConfig, device):
    """(model, tokenizer) of one RM, on `device`, in eval mode; one clear error when it does not load."""
    import torch

    from pipeline.data.render import check_tokenizer_templates
    from pipeline.models import (
        ModelLoadError,
        check_model_source,
        copy_pad_token_id,
        load_reward_model,
        load_tokenizer,
    )

    path = entry["path"]
    external = bool(entry.get("external"))
    tok_path = path
    if external:
        tok_path = check_external_rm(name, path, cfg.trust_remote_code)
        check_model_source(path, key=f"calibration.external_rms.{name}")  # weights, an adapter's base
    elif not Path(path).is_dir():
        raise FileNotFoundError(
            f"calibration: reward model {name!r}: directory {path} does not exist (listed in DIR/reward/index.json); "
            "rerun the reward stage or fix the path"
        )
    load_dtype = cfg.load_dtype
    if load_dtype == "auto":
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        load_dtype = "bfloat16" if cuda_bf16 else "float32"
    try:
        tok = load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
        model = load_reward_model(
            path, dtype=getattr(torch, load_dtype), bits=cfg.bits, trust_remote_code=cfg.trust_remote_code
        )
        had_pad = getattr(model.config, "pad_token_id", None) is not None
        copy_pad_token_id(model, tok, key=f"calibration: reward model {name!r} ({path})")
    except Exception as e:  # noqa: BLE001 - one clear message whatever broke inside transformers
        expected = (
            SUPPORTED_RMS
            if external
            else "Expected a save_pretrained directory with config.json, model "
            "weights and a tokenizer, as the reward stage writes."
        )
        if isinstance(e, ModelLoadError):
            raise ModelLoadError(f"calibration: reward model {name!r}: {e}") from None
        raise ModelLoadError(
            f"calibration: reward model {name!r} at {path} does not load ({type(e).__name__}: {e}). {expected}"
        ) from e
    if external:  # the template it ships renders conversational data: checked like a recipe's
        check_tokenizer_templates(tok.chat_template, f"calibration.external_rms.{name} ({tok_path})")
        try:
            head = find_reward_head(model)
        except ValueError as e:
            raise ValueError(f"calibration: external reward model {name!r} ({path}): {e}. {SUPPORTED_RMS}") from e
        out = getattr(head, "out_features", None)  # a torch module: only a Linear head has out_features
        if out is None and hasattr(head, "modules_to_save"):  # a PEFT ModulesToSaveWrapper
            out = getattr(getattr(head, "original_module", None), "out_features", None)
        if out not in (None, 1):
            raise ValueError(
                f"calibration: external reward model {name!r} ({path}): its reward head has {out} "
                f"outputs, not one. {SUPPORTED_RMS}"
            )
    if not had_pad:
        warn_eos_padding(name, path, model, tok)
    if not cfg.bits:
        model = model.to(device)
    model.eval()
    return model, tok


def warn_eos_padding(name: str, path: str, model, tok) -> None:
    """An RM whose config.json has no pad_token_id gets its tokenizer's pad id, which is EOS when the tokenizer
    has no pad token of its own (`load_tokenizer` falls back to it). Every scored text ends with EOS (appended,
    as TRL does), and the model reads the reward at its rightmost non-pad token: the token BEFORE that EOS.
    That is right for an RM trained so (TRL with pad = EOS) and wrong for one trained reading the reward at the
    EOS, and nothing in the checkpoint says which: warn, naming the fix."""
    eos = getattr(tok, "eos_token_id", None)
    if eos is None or getattr(model.config, "pad_token_id", None) != eos:
        return
    say(
        "calibration",
        f"warning: reward model {name!r} ({path}): its config.json has no pad_token_id and its tokenizer pads with "
        f"EOS (no pad token of its own), so EOS (id {eos}) is its pad id; every scored text ends with EOS and the reward is "
        "read at the token BEFORE it. Right if the RM was trained so (e.g. TRL with pad = EOS); if it was "
        "trained reading the reward at the EOS, set pad_token_id in its config.json to its tokenizer's pad "
        "token (add one if it has none) and rerun the calibration stage",
    )
