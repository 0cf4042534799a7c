"""Model and tokenizer construction: tiny in-process models for CPU work, and loading of real checkpoints.

Nothing here downloads: `tiny_tokenizer` trains a BPE tokenizer on the texts it is given, and
`tiny_model` builds a randomly initialised model of a real architecture (GPT-NeoX/Pythia, Llama, BERT)
from a config. `load_reward_model` loads any `AutoModelForSequenceClassification` checkpoint from a
local directory or a hub id, with optional 4/8-bit quantization and LoRA.
"""

from __future__ import annotations

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
    max_position_embeddings: int = field(default=1024, metadata={"help": "Longest sequence the model accepts."})


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


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad (pad falls back to EOS, then to a new <pad> token)."""
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD})
    return tok


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
    """
    if not (os.path.isdir(path) or "/" in path):
        raise FileNotFoundError(
            f"reward model {path!r} is neither a local directory nor a hub id (owner/name); "
            "point it at a directory written by the reward stage or by save_pretrained"
        )
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

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, **kwargs)
        return model.merge_and_unload() if not bits else model
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load a reward model from {path!r}: {e}. Expected a directory written by "
            "save_pretrained (config.json + model.safetensors) or a hub id."
        ) from e


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
