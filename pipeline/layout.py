"""The pair layout: how reward-model inputs are laid out and where the reward is read, in one place.

Scoring (pipeline.scoring) and training (pipeline.reward.packing, pipeline.reward.trainer) both build their packed
batches and read their rewards with these functions, so the two cannot drift apart. Every function here replicates
what the model's own forward pass does on one sequence alone (unbatched, no padding):

* `readout_index` / `pool_features`: the position a sequence-classification model reads its reward at (the
  rightmost token that is not the MODEL's config pad id, transformers' rule), whatever id the caller pads with.
* `shared_prefix`, `packed_length`, `pack_pair_rows`: pairs packed as prefix + chosen continuation + rejected
  continuation with restarted position ids and a boolean 4D mask.
* `packed_attention_mask`: that mask in the form the model's attention implementation consumes (boolean for sdpa,
  additive float for eager, which ADDS a given 4D mask to the scores) with the model's sliding window applied (one
  mask per layer type for models that alternate sliding and full layers, e.g. Gemma-2).
* `packing_problem`: why a model cannot take the packed layout exactly (None when it can); such models are scored
  and trained on padded batches instead, never approximately.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch


HEAD_NAMES = ("score", "classifier", "v_head")
PACKABLE_ATTENTION = ("sdpa", "eager")  # the kernels that take an arbitrary 4D mask (flash/flex kernels do not)
_UNSUPPORTED_WINDOWS = ("attention_chunk_size", "window_size", "attention_layers")  # local attention we do not lay out


def unwrap_model(model):
    """The transformers model inside PEFT / DeepSpeed / DDP wrappers (whose forward hides its signature)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def find_reward_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps pooled/last hidden states to the scalar reward (score, classifier, ...).

    Works through PEFT wrappers (ModulesToSaveWrapper keeps the name) and DeepSpeed engines.
    """
    candidates = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in HEAD_NAMES]
    if not candidates:
        raise ValueError(
            f"could not find the reward head of {type(model).__name__}: expected a submodule named one of "
            f"{HEAD_NAMES} (AutoModelForSequenceClassification models have one)"
        )
    return min(candidates, key=lambda nm: nm[0].count("."))[1]


def model_pad_id(model) -> int | None:
    """The pad id the model pools by (its text config's `pad_token_id`), which may differ from the tokenizer's."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    return config.get_text_config().pad_token_id


def readout_index(seq: Sequence[int], pad_id: int | None) -> int:
    """Index a sequence-classification model reads the reward at, for `seq` alone: the rightmost token that is not
    `pad_id` (the model's config pad id), 0 when every token is one, the last token when `pad_id` is None."""
    if pad_id is None:
        return len(seq) - 1
    for j in range(len(seq) - 1, -1, -1):
        if seq[j] != pad_id:
            return j
    return 0


def pool_features(head_input: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Pooled features z with reward = w^T z, from the head's input.

    BERT-style heads already receive pooled [B, H] features. Decoder heads receive [B, T, H] and the model
    reads the rightmost non-pad token (transformers' rule, replicated here exactly; see `readout_index`).
    """
    if head_input.ndim == 2:
        return head_input
    if pad_token_id is None:
        return head_input[:, -1]
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    idx = (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)
    return head_input[torch.arange(head_input.shape[0], device=head_input.device), idx.to(head_input.device)]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share (TRL's `common_prefix_length`)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens both sides of a pair share and a packed pair encodes once (the prompt). At least 2 tokens of
    each side stay out of it, so each side keeps its own last tokens; 0 when they share nothing."""
    return max(0, min(common_prefix_length(chosen, rejected), len(chosen) - 2, len(rejected) - 2))


def packed_length(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Tokens of a pair packed with one copy of its shared prefix."""
    return len(chosen) + len(rejected) - shared_prefix(chosen, rejected)


def pack_pair_rows(
    rows: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], pad_id: int, readout_pad_id: int | None = None
):
    """Lay out preference pairs packed into rows: each row holds one or more pairs back to back, each pair
    as prefix + chosen continuation + rejected continuation (see `shared_prefix`).

    Positions restart at 0 for every pair and at the prefix length for the rejected continuation; the 4D
    boolean attention mask [B, 1, W, W] (True: attend) is causal within a pair, lets the rejected continuation
    see the prefix but not the chosen one, and keeps pairs of one row apart. Padding rows attend to themselves
    only (no empty softmax). Give it to a model through `packed_attention_mask`. Returns `(input_ids [B, W],
    position_ids [B, W], mask, read_c, read_r)` where read_c/read_r are flat indices into the B*W positions of
    each pair's pooling token (`readout_index` of each side with `readout_pad_id`, the MODEL's pad id; `pad_id`
    only fills the rows), in the order the pairs were given, row by row.
    """
    lengths = [sum(packed_length(c, r) for c, r in row) for row in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    read_c, read_r = [], []
    for b, row in enumerate(rows):
        at = 0
        for c, r in row:
            L = shared_prefix(c, r)
            t = len(c) + len(r) - L
            s = slice(at, at + t)
            ids[b, s] = torch.as_tensor(list(c) + list(r[L:]), dtype=torch.long)
            pos[b, at : at + len(c)] = torch.arange(len(c))
            pos[b, at + len(c) : at + t] = torch.arange(L, len(r))
            mask[b, 0, s, s] = torch.tril(torch.ones(t, t, dtype=torch.bool))
            mask[b, 0, at + len(c) : at + t, at + L : at + len(c)] = False  # rejected cannot see chosen
            k_c, k_r = readout_index(c, readout_pad_id), readout_index(r, readout_pad_id)
            read_c.append(b * width + at + k_c)
            # a rejected read-out inside the prefix reads the prefix copy (the same token, position and context)
            read_r.append(b * width + at + (k_r if k_r < L else len(c) + k_r - L))
            at += t
        mask[b, 0, at:, at:] = torch.eye(width - at, dtype=torch.bool)
    return ids, pos, mask, read_c, read_r


@functools.cache
def _forward_takes_mask_mapping(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping := attention_mask, dict" in source


def _takes_mask_per_layer_type(model) -> bool:
    """Whether the decoder's forward takes `attention_mask` as a mapping {layer type: 4D mask} (the transformers
    models with `config.layer_types`, e.g. Qwen2, Gemma-2, whose forward checks for a prepared dict)."""
    return _forward_takes_mask_mapping(type(getattr(model, "base_model", model)))


def _layer_windows(model) -> tuple[dict[str, int | None], str | None]:
    """({layer type: sliding window or None}, problem): the attention pattern of every layer, keyed by layer type
    for a model that takes one mask per layer type, else {"": window} (one mask for all layers, Mistral style:
    `config.sliding_window` applies to every layer); or why it cannot be laid out in packed masks."""
    config = model.config.get_text_config()
    for name in _UNSUPPORTED_WINDOWS:
        if getattr(config, name, None) is not None:
            return {}, f"its config sets {name} (a local attention pattern the packed mask does not replicate)"
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if not kinds or not _takes_mask_per_layer_type(model):
        if len(kinds) > 1:
            return {}, f"its layers mix attention types {sorted(kinds)} but its forward takes one mask for all"
        return {"": window}, None
    unknown = kinds - {"full_attention", "sliding_attention"}
    if unknown:
        return {}, f"its layers use attention types {sorted(unknown)} (not laid out in a packed mask)"
    if "sliding_attention" in kinds and window is None:
        return {}, "it has sliding-attention layers but no sliding_window"
    return {kind: window if kind == "sliding_attention" else None for kind in kinds}, None


def packing_problem(model) -> str | None:
    """Why `model` cannot score or train on packed pairs EXACTLY (same rewards as its own forward pass on each
    sequence alone), or None when it can. Packing needs a decoder whose forward takes position ids and a 4D mask
    (sdpa or eager attention), full or sliding-window attention in its layers (several patterns only where the
    model takes one mask per layer type), and a reward head to read per-position rewards from."""
    model = unwrap_model(model)
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if not ("cache" in params or "past_key_values" in params):  # BERT-style encoders take neither
        return f"{name} is not a decoder (bidirectional attention cannot take the packed layout)"
    if "position_ids" not in params:
        return f"{name}.forward takes no position_ids"
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is None:
        return f"{name} has no attention implementation set (cannot tell how it consumes a 4D mask)"
    if impl not in PACKABLE_ATTENTION:
        return (
            f"{name} uses attn_implementation={impl!r}, which takes no 4D attention mask (packing needs sdpa or eager)"
        )
    _, problem = _layer_windows(model)
    if problem:
        return f"{name}: {problem}"
    try:
        find_reward_head(model)
    except ValueError as e:
        return str(e)
    return None


def packable(model) -> bool:
    """Whether `model` takes the packed pair layout exactly (see `packing_problem`)."""
    return packing_problem(model) is None


def packed_attention_mask(model, mask: torch.Tensor, position_ids: torch.Tensor):
    """The boolean packed mask of `pack_pair_rows` ([B, 1, W, W], True: attend) as `model` consumes it: the
    model's sliding window applied on the tokens' positions (a query at position p sees keys at positions above
    p - window, transformers' rule), boolean for sdpa, additive for eager (0 where attended, the dtype's minimum
    elsewhere: eager attention adds a given 4D mask to the scores, so a boolean one would mask nothing). For a
    model that takes one mask per layer type (e.g. Gemma-2's alternating sliding and full layers) a dict of them."""
    model = unwrap_model(model)
    windows, problem = _layer_windows(model)
    if problem:
        raise ValueError(f"{type(model).__name__} cannot take a packed mask: {problem}")
    eager = model.config._attn_implementation == "eager"
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    out = {}
    for kind, window in windows.items():
        m = mask
        if window is not None:
            pos = position_ids.to(mask.device)
            m = m & ((pos[:, :, None] - pos[:, None, :]) < window)[:, None]
        if eager:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        out[kind] = m
    return out[""] if "" in out else out
