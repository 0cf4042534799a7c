"""Loading and saving the alignment stage's policies (full models and QLoRA adapter directories alike), and a
sampling convenience. The base policy itself is the policy stage's (`pipeline.policy`, DIR/policy/).

May import: pipeline leaves and `pipeline.align.generate`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt (left padding); returns the decoded texts and whether each hit EOS.

    A small convenience for tests and quick looks over the alignment stage's sampler (generate.sample).
    """
    from pipeline.align.generate import sample

    out = sample(
        model,
        tokenizer,
        prompts,
        n=1,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_length=None,
        seed=seed,
        dtype=None,
    )
    return [t[0] for t in out.texts], [e[0] for e in out.ended]


# ---------------------------------------------------------------------------------------------------
# loading / saving policies


def load_policy(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = "auto",
    bits: int | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from a save_pretrained directory (or hub id); an adapter directory is loaded onto its base.

    `dtype="auto"`: bf16 on a CUDA device that supports it, else float32.
    """
    from transformers import AutoModelForCausalLM

    from pipeline.models import quantization_config

    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    path = str(path)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if bits:
        from accelerate import PartialState

        on_gpu = {"": PartialState().local_process_index} if torch.cuda.is_available() else None
        kwargs.update(quantization_config=quantization_config(bits), device_map=on_gpu)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not (os.path.isdir(path) or looks_like_hub_id):
        raise FileNotFoundError(
            f"policy {path!r} is neither a local directory nor a hub id (owner/name); set align.model_name_or_path "
            "to a save_pretrained directory, or leave it null for the synthetic tiny policy"
        )
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise type(e)(f"cannot load the policy from {path!r}: {e}") from e


def save_policy(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
