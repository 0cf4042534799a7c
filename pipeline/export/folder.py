"""The exported folder: one RM as a standalone `AutoModelForSequenceClassification` + `AutoTokenizer` folder that
the RL engines load as it is.

What `prepare` changes on the loaded RM before it is saved, and why:

* **pad**: the model's config pad id and the tokenizer's pad token agree (TRL sets the model's pad to the tokenizer's,
  EOS when the tokenizer has none). The model's own pad id wins, since the pipeline reads the reward at the
  rightmost token that is not it; a tokenizer without a pad token gets that token, and an RM without any pad id
  gets EOS for both (recorded in export.json: the pipeline then read at the last token).
* **temperature** (on request): the scalar head's weight and bias divided by the fitted temperature T, so the
  folder's reward is the calibrated reward r / T.
* **chat template** (when the tokenizer has none): a template that writes a conversation in the pipeline's plain
  layout (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, `pipeline.data.render`) between the special tokens the
  pipeline's tokenization puts around a text (a BOS; the EOS it appends, left out when the EOS is the pad id,
  which the read-out skips anyway). Engines that score conversations through the RM's chat template with
  `add_special_tokens=False` (TRL with conversational prompts, verl) then build the pipeline's own token ids.
* **verl's head**: verl's reward worker loads the folder with `AutoModelForTokenClassification`, whose head has
  other parameter names (GPT-NeoX: `classifier.weight` / `classifier.bias`) or a bias (Llama: `score.bias`) that a
  sequence-classification checkpoint lacks, so transformers would initialise them afresh. The weights file gets
  those tensors too (the scalar head's weight, its bias or 0); loading the folder as a sequence classifier lists
  them as unused keys, which is harmless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.data.render import PLAIN_MARKERS, has_chat_template
from pipeline.data.tokenize import special_affixes
from pipeline.layout import find_reward_head, unwrap_model


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def plain_chat_template(prefix: str = "", suffix: str = "") -> str:
    """A Jinja chat template writing messages in the pipeline's plain layout: `prefix`, then every message as its
    marker, a space and its content stripped (`pipeline.data.render.plain_prompt` / `plain_response`), then
    `suffix`; with `add_generation_prompt` the assistant marker instead of the suffix."""
    branches = "".join(
        f"{{% {'if' if i == 0 else 'elif'} message['role'] == {_jinja_str(role)} %}}"
        f"{{{{ {_jinja_str(marker + ' ')} }}}}"
        for i, (role, marker) in enumerate(PLAIN_MARKERS.items())
    )
    unknown = "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    return (
        f"{{{{ {_jinja_str(prefix)} }}}}{{% for message in messages %}}{branches}{unknown}"
        "{{ (message['content'] or '') | trim }}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {_jinja_str(PLAIN_MARKERS['assistant'])} }}}}"
        f"{{% else %}}{{{{ {_jinja_str(suffix)} }}}}{{% endif %}}"
    )


def _as_text(tokenizer, ids: list[int]) -> str | None:
    """The text of special-token ids that tokenizes back to exactly those ids (add_special_tokens=False); None
    when some id has no such text (the template then cannot write it)."""
    text = "".join(tokenizer.convert_ids_to_tokens(list(ids)))
    back = tokenizer(text, add_special_tokens=False)["input_ids"] if ids else []
    return text if back == list(ids) else None


def fix_pad(model, tokenizer) -> dict:
    """Make the model's config pad id and the tokenizer's pad token agree (see the module docstring); returns what
    was done, for export.json."""
    config = unwrap_model(model).config.get_text_config()
    model_pad, tok_pad = config.pad_token_id, tokenizer.pad_token_id
    done = {"model_pad_id": model_pad, "tokenizer_pad_id": tok_pad}
    if model_pad is None and tok_pad is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the RM has no pad id and its tokenizer neither a pad nor an EOS token: cannot export it")
        tokenizer.pad_token = tokenizer.eos_token
        done["change"] = "no pad id anywhere: pad = EOS for both (the pipeline read the last token)"
    elif model_pad is None:
        done["change"] = "model config pad id set to the tokenizer's"
    elif tok_pad != model_pad:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model_pad)
        done["change"] = "tokenizer pad token set to the model's pad id (where the pipeline reads the reward)"
    config.pad_token_id = tokenizer.pad_token_id
    unwrap_model(model).config.pad_token_id = tokenizer.pad_token_id
    done["pad_id"] = tokenizer.pad_token_id
    done["pad_is_eos"] = tokenizer.pad_token_id == tokenizer.eos_token_id
    return done


@torch.no_grad()
def fold_temperature(model, temperature: float) -> None:
    """Divide the scalar head's weight and bias by `temperature` (the folder's reward becomes r / T)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    head = find_reward_head(model)
    for p in head.parameters(recurse=False):
        p.div_(temperature)


def pipeline_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the body of a text in the pipeline's tokenization (`encode_left_flags`): the
    tokenizer's special prefix, and its special suffix or else the EOS the pipeline appends."""
    prefix, suffix = special_affixes(tokenizer)
    if not suffix and tokenizer.eos_token_id is not None:
        suffix = [tokenizer.eos_token_id]
    return prefix, suffix


def ship_chat_template(tokenizer) -> dict:
    """Give a tokenizer without a chat template `plain_chat_template` with the pipeline's special tokens (a trailing
    pad id left out: the read-out skips it); returns what was done, for export.json."""
    if has_chat_template(tokenizer):
        return {"chat_template": "the RM's own (kept)"}
    prefix, suffix = pipeline_affixes(tokenizer)
    while suffix and suffix[-1] == tokenizer.pad_token_id:
        suffix = suffix[:-1]
    texts = _as_text(tokenizer, prefix), _as_text(tokenizer, suffix)
    if None in texts:
        return {"chat_template": None, "why": "the special tokens around a text have no text form that tokenizes back"}
    tokenizer.chat_template = plain_chat_template(*texts)
    return {"chat_template": "plain layout", "prefix": texts[0], "suffix": texts[1]}


def _verl_head_tensors(model, state_keys: set[str]) -> dict[str, torch.Tensor]:
    """The head tensors `AutoModelForTokenClassification` (num_labels=1) expects and the saved checkpoint lacks,
    filled from the scalar head (weight; bias or 0)."""
    from transformers import AutoModelForTokenClassification

    model = unwrap_model(model)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = 1
    try:
        with torch.device("meta"):
            tc = AutoModelForTokenClassification.from_config(config)
    except (ValueError, KeyError):  # no token-classification class for this architecture
        return {}
    head = find_reward_head(model)
    prefix = tc.base_model_prefix + "."
    out = {}
    for name, p in tc.named_parameters():
        if name.startswith(prefix) or name in state_keys:
            continue
        if name.endswith("weight") and tuple(p.shape) == tuple(head.weight.shape):
            out[name] = head.weight.detach().clone().contiguous()
        elif name.endswith("bias") and p.ndim == 1 and p.shape[0] == 1:
            bias = getattr(head, "bias", None)
            out[name] = bias.detach().clone().contiguous() if bias is not None else torch.zeros(1, dtype=p.dtype)
    return {k: v.to(head.weight.dtype) for k, v in out.items()}


def add_verl_head(model, folder: Path) -> list[str]:
    """Write `_verl_head_tensors` into the saved weights (single file rewritten; a sharded checkpoint gets one more
    shard in its index); returns the names added."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        meta = json.loads(index.read_text(encoding="utf-8"))
        keys = set(meta["weight_map"])
    else:
        with safe_open(single, "pt") as f:
            keys = set(f.keys())
    extra = _verl_head_tensors(model, keys)
    if not extra:
        return []
    if index.is_file():
        save_file(extra, folder / "model-verl-head.safetensors", metadata={"format": "pt"})
        meta["weight_map"].update(dict.fromkeys(extra, "model-verl-head.safetensors"))
        index.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    else:
        tensors = load_file(single)
        tensors.update(extra)
        tmp = single.with_name(".model.safetensors.tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, single)
    return sorted(extra)


def save_folder(model, tokenizer, out: Path, *, verl_head: bool = True) -> dict:
    """save_pretrained of the model (fp32 kept as it is) and the tokenizer into `out`, plus verl's head."""
    out.mkdir(parents=True, exist_ok=True)
    unwrap_model(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    added = add_verl_head(model, out) if verl_head else []
    return {"verl_head_keys": added}
