"""Model and tokenizer construction: tiny in-process models for CPU work, and loading of real checkpoints.

Nothing here downloads: `tiny_tokenizer` trains a BPE tokenizer on the texts it is given, and
`tiny_model` builds a randomly initialised model of a real architecture (GPT-NeoX/Pythia, Llama, BERT)
from a config. `load_reward_model` loads any `AutoModelForSequenceClassification` checkpoint from a
local directory or a hub id, with optional 4/8-bit quantization and LoRA.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from pipeline.io import is_hub_id
from pipeline.strict import COUNT


PAD, EOS, UNK, BOS = "<pad>", "<eos>", "<unk>", "<bos>"

# Hidden size, layers, heads, intermediate size of the tiny presets. "tiny" stays under 1M params with
# a 1k vocabulary (for tests); "small" is ~25M params (the benchmark size the developers' guide budgets).
TINY_SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=128),
    "mini": dict(hidden=128, layers=4, heads=4, intermediate=512),
    "small": dict(hidden=512, layers=6, heads=8, intermediate=2048),
}


def tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, *, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (no download) with <pad>, <eos>, <unk>, <bos>.

    The pad token differs from EOS so that sequence-classification pooling (rightmost non-pad token)
    lands on the EOS that TRL appends. `chat_template` (Jinja) is set on the tokenizer, and the
    ``<|...|>`` markers it writes become special tokens (one id each, never split or merged).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.data.render import template_special_tokens

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK, BOS] + template_special_tokens(chat_template),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS)
    fast.model_max_length = 4096
    if chat_template:
        fast.add_special_tokens({"additional_special_tokens": template_special_tokens(chat_template)})
        fast.chat_template = chat_template
    return fast


@dataclass
class TinyModelSpec:
    """A randomly initialised model of a real architecture, built from a config."""

    arch: str = field(default="gpt_neox", metadata={"help": "gpt_neox | llama | bert"})
    size: str = field(default="tiny", metadata={"help": "tiny (<1M params) | mini | small (~25M params)"})
    max_position_embeddings: int = field(
        default=1024, metadata={"range": COUNT, "help": "Longest sequence the model accepts."}
    )


def _config(spec: TinyModelSpec, tokenizer, **extra):
    s = TINY_SHAPES[spec.size]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["intermediate"],
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    if spec.arch == "gpt_neox":
        return GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.25)
    if spec.arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=s["heads"])
    if spec.arch == "bert":
        return BertConfig(**common, type_vocab_size=1)
    raise ValueError(f"unknown tiny architecture {spec.arch!r}: use gpt_neox, llama or bert")


def tiny_model(spec: TinyModelSpec, tokenizer, *, task: str = "reward", seed: int = 0) -> torch.nn.Module:
    """Build a random-init model: task='reward' gives a scalar-head sequence classifier, 'causal_lm' a policy."""
    torch.manual_seed(seed)
    if task == "reward":
        config = _config(spec, tokenizer, num_labels=1)
        return AutoModelForSequenceClassification.from_config(config)
    if task == "causal_lm":
        if spec.arch == "bert":
            raise ValueError("a BERT model cannot be a policy: use gpt_neox or llama for task='causal_lm'")
        return AutoModelForCausalLM.from_config(_config(spec, tokenizer))
    raise ValueError(f"unknown task {task!r}: use 'reward' or 'causal_lm'")


def pythia_1_4b_config(tokenizer):
    """Pythia-1.4B's architecture (GPT-NeoX, hidden 2048, 24 layers, 1.31B params with a scalar head), for
    random-init throughput benchmarks (scripts/bench_reward.py, scripts/bench_train.py; ANCHORS.md's shape)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


class ModelLoadError(ValueError):
    """A model or tokenizer the user named cannot be loaded; the message names it, the problem and the fix."""


class ModelNotFound(ModelLoadError, FileNotFoundError):
    """The named model is neither an existing directory nor a hub id (also a FileNotFoundError)."""


_SAVE_PRETRAINED = "a directory written by save_pretrained (config.json, model.safetensors, tokenizer files)"


def _read_json(path: str | os.PathLike, key: str) -> dict:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except json.JSONDecodeError as e:
        raise ModelLoadError(
            f"{key}: {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). Fix: repair the file "
            "or save the model again with save_pretrained"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{key}: cannot read {path} ({e}). Fix: check the file") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{key}: {path} holds a {type(data).__name__}, not a JSON object. Fix: repair the file")
    return data


def _has_weights(d: str | os.PathLike, prefixes=("model", "pytorch_model", "adapter_model")) -> bool:
    names = os.listdir(d)
    return any(n.endswith((".safetensors", ".bin")) and n.startswith(prefixes) for n in names) or any(
        n.endswith(".index.json") and n.startswith(prefixes) for n in names
    )


def check_model_source(path: str, *, key: str = "model") -> None:
    """Fail with ONE clear `ModelLoadError` (naming `key`, the path, the problem and the fix) unless `path` is a
    hub id (owner/name; checked when it is fetched) or a local model directory: a config.json that parses and
    names a model_type, and weights; or a PEFT adapter (adapter_config.json + adapter weights) whose base model
    is a directory that exists or a hub id."""
    local = os.path.expanduser(str(path))
    if not os.path.exists(local):
        if is_hub_id(path):
            return
        raise ModelNotFound(
            f"{key}: {path!r} is neither an existing directory nor a hub id (owner/name). Fix: point {key} at "
            f"{_SAVE_PRETRAINED}, or give a hub id"
        )
    if not os.path.isdir(local):
        raise ModelLoadError(f"{key}: {path} is a file, not a model directory. Fix: give {_SAVE_PRETRAINED}")
    adapter = os.path.join(local, "adapter_config.json")
    if os.path.isfile(adapter):
        base = _read_json(adapter, key).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(
                f"{key}: the PEFT adapter in {path} has no base_model_name_or_path in adapter_config.json. Fix: set "
                "it to the base model's directory or hub id"
            )
        base_local = os.path.expanduser(str(base))
        if not os.path.isdir(base_local) and not is_hub_id(base):
            raise ModelLoadError(
                f"{key}: the PEFT adapter in {path} is for the base model {base!r} (base_model_name_or_path in "
                "adapter_config.json), which does not exist. Fix: put the base model there, or set "
                "base_model_name_or_path to its directory or hub id"
            )
        if not _has_weights(local, ("adapter_model",)):
            raise ModelLoadError(
                f"{key}: the PEFT adapter in {path} has no weights (adapter_model.safetensors). Fix: save the "
                "adapter again with save_pretrained"
            )
        return
    config = os.path.join(local, "config.json")
    if not os.path.isfile(config):
        files = sorted(os.listdir(local))
        shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "") if files else "it is empty"
        raise ModelLoadError(
            f"{key}: {path} is not a model directory: it has no config.json ({shown}). Fix: give {_SAVE_PRETRAINED}"
        )
    if "model_type" not in _read_json(config, key):
        raise ModelLoadError(
            f"{key}: {config} has no model_type, so transformers cannot tell the architecture. Fix: add it (e.g. "
            '"model_type": "gpt_neox") or save the model again with save_pretrained'
        )
    if not _has_weights(local):
        raise ModelLoadError(
            f"{key}: {path} has a config.json but no weights (model.safetensors, model-*-of-*.safetensors or "
            "pytorch_model.bin). Fix: copy the weights there or save the model again with save_pretrained"
        )


def hub_error(path: str, key: str, e: Exception) -> ModelLoadError:
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return ModelLoadError(
        f"{key}: {path!r} is no local directory, and as a hub id it cannot be loaded ({reason}). Fix: check the id, "
        "the network (HF_HUB_OFFLINE, a proxy) and the access token, or download it and give its directory"
    )


# Files a tokenizer's vocabulary is saved in (one is enough; `.model`, `.tiktoken` and `.spm` files too). A model
# directory without any still "loads" a tokenizer: transformers builds an EMPTY one from config.json alone (a
# vocabulary of its 2 special tokens, every text encoded to no ids), so an RM would score every pair a tie.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "merges.txt")
_VOCAB_SUFFIXES = (".model", ".tiktoken", ".spm")


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """Whether the local directory `path` holds a tokenizer's vocabulary (`TOKENIZER_VOCAB_FILES`)."""
    names = os.listdir(path)
    return any(n in TOKENIZER_VOCAB_FILES or n.endswith(_VOCAB_SUFFIXES) for n in names)


def check_tokenizer_files(path: str, *, key: str = "tokenizer") -> None:
    """One `ModelLoadError` naming `key`, the folder and the missing files when the local directory `path` has no
    tokenizer vocabulary (a hub id or a path that is not a directory passes: checked when loaded)."""
    local = os.path.expanduser(str(path))
    if not os.path.isdir(local) or has_tokenizer_files(local):
        return
    raise ModelLoadError(
        f"{key}: {path} has no tokenizer files (none of {', '.join(TOKENIZER_VOCAB_FILES)}, *.model): "
        "transformers would build an empty tokenizer from config.json alone (every text encoded to no tokens: an RM "
        "would score every pair a tie, or train at loss ln 2). Fix: save the tokenizer there too (tokenizer.save_pretrained)"
    )


def _check_encodes(tok, path: str, key: str) -> None:
    """A tokenizer that encodes a plain sentence to no ids (an empty vocabulary) is refused."""
    if not tok("Hello world, 123.", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"{key}: the tokenizer loaded from {path} encodes text to no tokens (vocabulary of {len(tok)}): its "
            "tokenizer files are missing or empty. Fix: save the model's tokenizer there (tokenizer.save_pretrained)"
        )


def load_tokenizer(path: str, *, trust_remote_code: bool = False, key: str | None = None):
    """Load a tokenizer and make sure it can pad (pad falls back to EOS, then to a new <pad> token).

    A local directory without tokenizer files, or a tokenizer that encodes text to no tokens, is one
    `ModelLoadError` (never the empty tokenizer transformers builds from config.json alone). With `key` (the
    recipe key naming `path`), a path that is not a model/tokenizer directory, or a hub id that cannot be
    fetched, is one `ModelLoadError` naming the key and the fix."""
    check_tokenizer_files(path, key=key or "tokenizer")
    if key is None:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        if not os.path.isdir(os.path.expanduser(str(path))):
            check_model_source(path, key=key)
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if not os.path.isdir(os.path.expanduser(str(path))):
                raise hub_error(path, key, e) from None
            raise ModelLoadError(
                f"{key}: no tokenizer loads from {path} ({type(e).__name__}: {str(e)[:300]}). Fix: save the "
                "tokenizer there too (tokenizer.save_pretrained)"
            ) from None
    _check_encodes(tok, path, key or "tokenizer")
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD})
    return tok


def saved_chat_templates(path: str | os.PathLike) -> dict[str, str]:
    """The chat templates a local tokenizer directory ships, read from its files without loading it ({name:
    text}; "default" for the main one): chat_template.jinja, additional_chat_templates/*.jinja, and the
    `chat_template` of tokenizer_config.json (a string, or a list of {"name", "template"}). Empty when none."""
    local = os.path.expanduser(str(path))
    out: dict[str, str] = {}
    if not os.path.isdir(local):
        return out
    config = os.path.join(local, "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            value = json.loads(open(config, encoding="utf-8").read()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            value = None  # loading the tokenizer reports a broken file
        if isinstance(value, str):
            out["default"] = value
        elif isinstance(value, list):
            out.update({t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t})
    jinja = os.path.join(local, "chat_template.jinja")
    if os.path.isfile(jinja):
        out["default"] = open(jinja, encoding="utf-8").read()
    extra = os.path.join(local, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                out[name[: -len(".jinja")]] = open(os.path.join(extra, name), encoding="utf-8").read()
    return out


def check_saved_templates(section, key: str, origin) -> None:
    """For --dry-run and a stage's `check`: the templates a section's local `model_name_or_path` ships (read from
    its files, `pipeline.models.saved_chat_templates`), when its `chat_template` is null so they are used; one
    RecipeError naming the template, the error and where the model was set."""
    from pipeline.data.render import check_tokenizer_templates
    from pipeline.errors import RecipeError

    path = section.model_name_or_path
    if section.chat_template is not None or not path:
        return
    try:
        check_tokenizer_templates(
            saved_chat_templates(path), f"{key}.model_name_or_path ({path})", f"{key}.chat_template"
        )
    except ValueError as e:
        raise RecipeError(f"{e} (in {origin(key + '.model_name_or_path')})") from None


def quantization_config(bits: int | None, compute_dtype: torch.dtype = torch.bfloat16):
    """A bitsandbytes config for 4-bit (NF4, QLoRA) or 8-bit loading; None for full precision."""
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization bits must be 4, 8 or null, got {bits!r}")


def load_reward_model(
    path: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    bits: int | None = None,
    trust_remote_code: bool = False,
    device_map=None,
):
    """Load a scalar-head sequence classifier from safetensors (a local dir or a hub id).

    A directory holding a LoRA adapter (adapter_config.json) is loaded onto its base model and merged.
    A directory that is not a model, a broken config.json, missing weights, an adapter whose base is missing
    and a hub id that cannot be fetched are each one `ModelLoadError` (see `check_model_source`).
    """
    check_model_source(path, key="reward model")
    kwargs = dict(
        num_labels=1,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True if os.path.isdir(path) else None,
        quantization_config=quantization_config(bits),
        device_map=device_map,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForSequenceClassification

        try:
            model = AutoPeftModelForSequenceClassification.from_pretrained(path, **kwargs)
        except OSError as e:
            raise ModelLoadError(
                f"reward model: the PEFT adapter in {path}: its base model does not load ({str(e).splitlines()[0][:300]}). Fix: check "
                "base_model_name_or_path in its adapter_config.json"
            ) from None
        return model.merge_and_unload() if not bits else model
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as e:
        if not os.path.isdir(path):
            raise hub_error(path, "reward model", e) from None
        raise ModelLoadError(
            f"could not load a reward model from {path!r}: {e}. Expected a directory written by "
            "save_pretrained (config.json + model.safetensors) or a hub id."
        ) from None


def copy_pad_token_id(model, tokenizer, *, key: str = "reward model") -> None:
    """A sequence classifier pools at the last non-pad token, so its config needs the pad token id (transformers
    refuses a batch of several sequences without it): copy the tokenizer's, or fail naming the model."""
    config = model.config
    if getattr(config, "pad_token_id", None) is not None:
        return
    pad = getattr(tokenizer, "pad_token_id", None)
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if pad is None or (vocab is not None and pad >= vocab):
        raise ModelLoadError(
            f"{key}: its config.json has no pad_token_id and its tokenizer has no pad token the model knows "
            f"(pad id {pad}, vocabulary {vocab}). Fix: set pad_token_id in its config.json (e.g. to the EOS id "
            f"{getattr(tokenizer, 'eos_token_id', None)})"
        )
    config.pad_token_id = pad
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = pad


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def section_model_inputs(section: dict) -> list[tuple[str, str]]:
    """(path or hub id, hub repo type) of what a model-loading recipe section (reward, align) names besides
    the data: its base model, and its chat template when that is a file (a template TEXT is part of the
    section itself, so it is already in the stage's hash)."""
    out = [(section.get("model_name_or_path"), "model")]
    template = section.get("chat_template")
    if isinstance(template, str) and "{" not in template and template.strip().lower() != "none":
        out.append((template, ""))
    return out
