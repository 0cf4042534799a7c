"""Implicit reward models: a policy trained by DPO read as a reward, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

Pure functions on a causal LM (no recipe, no stage; a leaf: imports `pipeline.data.tokenize`, `pipeline.layout`,
`pipeline.logs` and `pipeline.models` only). The numbers are TRL's DPOTrainer's (`rewards/chosen`,
`rewards/rejected`, per row): the sum over the RESPONSE tokens of each token's log-probability given everything
before it, for the policy minus for the reference, times beta.

How a (prompt, response) row becomes tokens (`encode_rows`), TRL's rules where TRL has one:

* text rows: ``tokenizer(prompt + response)`` with the tokenizer's own special tokens (a BOS), and an EOS appended
  when the tokenizer closes a text with nothing of its own (TRL appends the EOS text to every text completion; so
  does the pipeline for its RMs); the EOS is a response token. Rows rendered by a chat template (`templated`):
  no special token added, no EOS appended (the template writes its own end-of-turn marker, which counts).
* the response starts where the tokenized prompt and the tokenized prompt + response stop agreeing (TRL's
  `common_prefix_length`), so a token merged across the boundary counts as a response token.
* truncation (``max_length``): the pipeline's, not TRL's. Sequences longer than ``max_length`` are cut from the
  LEFT (the oldest prompt tokens go first; the tokenizer's leading special tokens, e.g. a BOS, are kept), as the
  pipeline's RMs are, so the response survives whole whenever it fits; only the response tokens left after the
  cut count (a response longer than the limit loses its start). TRL's `truncation_mode` default, ``keep_start``,
  cuts the END of the response instead; its ``keep_end`` is the same left cut (without keeping a BOS).

`sequence_logprobs` runs sequences in right-padded batches (longest first, ``max_tokens_per_batch`` caps sequences
x padded length): on each sequence the same sum as its own unbatched forward (fp32: within 1e-6 per token,
tested against a one-sequence-at-a-time float64 computation). Logits are upcast to fp32 before the log-softmax;
no autocast is applied unless asked for. `implicit_rewards` holds BOTH models on the device at once (the
calibration stage instead scores with the policy, frees it, then loads the reference: one model at a time).

`load_implicit_rm(spec)` loads a policy, its reference and the policy's tokenizer (whose chat template the policy
was trained with); a spec without a reference is refused unless it says ``reference_free: true`` (then
r = beta * log pi(y|x)).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.data.tokenize import special_affixes
from pipeline.layout import common_prefix_length
from pipeline.logs import progress_bar


# --------------------------------------------------------------------------------------------------
# Tokens


def _as_flags(templated: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(templated, bool):
        return [templated] * n
    flags = [bool(t) for t in templated]
    if len(flags) != n:
        raise ValueError(f"templated: {len(flags)} flags for {n} rows; give one per row or a single bool")
    return flags


def encode_rows(
    tokenizer,
    rows: Sequence[tuple[str, str]],
    max_length: int | None = None,
    *,
    templated: bool | Sequence[bool] = False,
) -> tuple[list[list[int]], list[int], list[bool]]:
    """(ids, starts, truncated) of (prompt, response) rows: each row's tokens, the index of its first response token
    and whether it was cut from the left to `max_length` (see the module docstring for the rules)."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens (a context and a response token), got {max_length}")
    flags = _as_flags(templated, len(rows))
    prefix, suffix = special_affixes(tokenizer)
    eos = tokenizer.eos_token_id
    if not rows:
        return [], [], []
    bodies = tokenizer([p + r for p, r in rows], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([p for p, _ in rows], add_special_tokens=False)["input_ids"]
    ids_out, starts, cut_flags = [], [], []
    for body, prompt_body, is_templated in zip(bodies, prompts, flags):
        head, tail = ([], []) if is_templated else (list(prefix), list(suffix))
        prompt_ids = head + list(prompt_body)
        if not is_templated and not tail and eos is not None and (not body or body[-1] != eos):
            tail = [eos]
        ids = head + list(body) + tail
        start = common_prefix_length(prompt_ids, ids)
        cut = 0
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            if len(head) + 1 > max_length:
                raise ValueError(
                    f"max_length={max_length} leaves no room beside the {len(head)} leading special tokens"
                )
            ids = head + ids[len(head) + cut :]
            start = max(start - cut, len(head)) if start >= len(head) else start
        ids_out.append(ids)
        starts.append(start)
        cut_flags.append(cut > 0)
    return ids_out, starts, cut_flags


# --------------------------------------------------------------------------------------------------
# Log-probabilities


def _batches(lengths: Sequence[int], batch_size: int, max_tokens_per_batch: int | None):
    """Index lists, longest sequences first, of at most `batch_size` sequences and (when set) at most
    `max_tokens_per_batch` sequences x padded length (at least one sequence)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    start = 0
    while start < len(order):
        width = max(lengths[order[start]], 1)
        n = batch_size if not max_tokens_per_batch else max(1, min(batch_size, max_tokens_per_batch // width))
        yield [int(i) for i in order[start : start + n]]
        start += n


@torch.no_grad()
def sequence_logprobs(
    model,
    ids: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Per sequence, the sum over its tokens t >= max(start, 1) of log p(ids[t] | ids[:t]) under the causal LM
    `model` (float64 array, input order). Right-padded batches; each sum equals the sequence's own unbatched
    forward. `dtype`: an autocast dtype (None: none); the log-softmax runs in fp32 (fp64 for a fp64 model) either
    way."""
    if len(ids) != len(starts):
        raise ValueError(f"sequence_logprobs: {len(ids)} sequences but {len(starts)} starts")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros(len(ids), dtype=np.float64)
    bar = progress_bar(total=len(ids), desc="log-probs", disable=not progress)
    try:
        for idx in _batches([len(s) for s in ids], batch_size, max_tokens_per_batch):
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = torch.as_tensor(list(ids[i]), dtype=torch.long)
                mask[row, : len(ids[i])] = 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(idx):
                first, n = max(int(starts[i]), 1), len(ids[i])
                if first >= n:
                    continue  # no response token: the sum is 0
                scores = logits[row, first - 1 : n - 1]
                scores = scores.double() if scores.dtype == torch.float64 else scores.float()
                logp = torch.log_softmax(scores, dim=-1)
                target = input_ids[row, first:n].to(logp.device)
                out[i] = float(logp.gather(-1, target[:, None]).double().sum())
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


def implicit_rewards(
    policy,
    reference,
    tokenizer,
    rows: Sequence[tuple[str, str]],
    beta: float,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device=None,
    templated: bool | Sequence[bool] = False,
    max_tokens_per_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """beta * (sum log pi(y|x) - sum log pi_ref(y|x)) over the response tokens of each (prompt, response) row;
    `reference=None` is reference-free scoring (beta * sum log pi(y|x)): the caller asked for it explicitly.
    Both models are used on `device` (default: the policy's)."""
    ids, starts, _ = encode_rows(tokenizer, rows, max_length, templated=templated)
    kw = dict(batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, device=device, dtype=dtype)
    logp = sequence_logprobs(policy, ids, starts, **kw)
    ref = sequence_logprobs(reference, ids, starts, **kw) if reference is not None else np.zeros_like(logp)
    return (float(beta) * (logp - ref)).tolist()


# --------------------------------------------------------------------------------------------------
# Loading


CAUSAL_LM = (
    "Supported: a causal language model (config.json architectures ending in 'ForCausalLM', e.g. the policy "
    "TRL's DPOTrainer saved, with its tokenizer), as a local save_pretrained directory or a hub id, or a PEFT "
    "adapter directory (task_type CAUSAL_LM) on one."
)


def check_causal_lm(path: str, *, key: str, trust_remote_code: bool = False) -> None:
    """One ValueError naming `key` unless `path` is a causal LM: a directory with config.json and weights whose
    architecture is a ...ForCausalLM (or a CAUSAL_LM PEFT adapter on a base that exists), or a hub id (checked
    when loaded). A sequence classifier or an encoder is refused: its LM head would not be the trained one."""
    import json

    from pipeline.models import ModelLoadError, check_model_source

    check_model_source(path, key=key)
    local = os.path.expanduser(str(path))
    if not os.path.isdir(local):
        return
    adapter = os.path.join(local, "adapter_config.json")
    if os.path.isfile(adapter):
        task = json.loads(open(adapter, encoding="utf-8").read()).get("task_type")
        if task != "CAUSAL_LM":
            raise ModelLoadError(
                f"{key}: {path} is a PEFT adapter with task_type {task!r}, not CAUSAL_LM. {CAUSAL_LM}"
            )
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - one clear message whatever broke inside transformers
        raise ModelLoadError(
            f"{key}: the config of {path} does not load ({type(e).__name__}: {e}). {CAUSAL_LM}"
        ) from e
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForCausalLM") for a in archs):
        what = f"a {', '.join(archs)} checkpoint" if archs else "a checkpoint whose config.json names no architecture"
        raise ModelLoadError(f"{key}: {path} is {what}, not a causal language model. {CAUSAL_LM}")


def load_causal_lm(
    path: str, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False, key: str = "model"
):
    """A causal LM (a CAUSAL_LM PEFT adapter merged into its base) on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import ModelLoadError, hub_error

    check_causal_lm(path, key=key, trust_remote_code=trust_remote_code)
    local = os.path.expanduser(str(path))
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        if os.path.isfile(os.path.join(local, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(local, **kwargs).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(local if os.path.isdir(local) else path, **kwargs)
    except OSError as e:
        if not os.path.isdir(local):
            raise hub_error(path, key, e) from None
        raise ModelLoadError(f"{key}: {path} does not load ({str(e).splitlines()[0][:300]}). {CAUSAL_LM}") from None
    return model.to(device).eval()


def tokenizer_source(path: str) -> str:
    """Where a policy's tokenizer is read from: its own directory, or a PEFT adapter's base without one."""
    import json

    from pipeline.models import has_tokenizer_files

    local = os.path.expanduser(str(path))
    adapter = os.path.join(local, "adapter_config.json")
    if not os.path.isfile(adapter) or has_tokenizer_files(local):
        return path
    try:
        return json.loads(open(adapter, encoding="utf-8").read()).get("base_model_name_or_path") or path
    except (OSError, ValueError, AttributeError):
        return path


def check_spec(spec: dict, key: str = "implicit RM") -> None:
    """A spec {policy, reference, beta, reference_free} that can be scored: a reference, or reference_free: true
    (not both), and beta > 0 (ValueError naming `key`)."""
    ref, free, beta = spec.get("reference"), bool(spec.get("reference_free", False)), spec.get("beta")
    if not spec.get("policy"):
        raise ValueError(f"{key}.policy: missing; give the DPO policy's directory or hub id")
    if ref is None and not free:
        raise ValueError(
            f"{key}.reference: missing. The implicit reward is beta * (log pi - log pi_ref): give the reference "
            f"model the policy was trained against (its directory or hub id), or set {key}.reference_free=true to "
            "score beta * log pi alone"
        )
    if ref is not None and free:
        raise ValueError(f"{key}: reference_free=true and a reference ({ref}) are both set; drop one")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not (0 < float(beta) < float("inf")):
        raise ValueError(
            f"{key}.beta = {beta!r}: must be a finite number > 0 (the DPO beta the policy was trained with)"
        )


def load_implicit_rm(
    spec: dict, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False, key: str = "implicit RM"
):
    """(policy, reference or None, tokenizer, beta) of a spec {policy: DIR or hub id, reference: DIR or hub id or
    None, beta: float, reference_free: bool}; the tokenizer is the policy's (its chat template is the one the
    policy was trained with). Both models end up on `device`: two models in memory."""
    from pipeline.models import load_tokenizer

    check_spec(spec, key)
    policy_path, ref_path = str(spec["policy"]), spec.get("reference")
    tok = load_tokenizer(tokenizer_source(policy_path), trust_remote_code=trust_remote_code, key=f"{key}.policy")
    load = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    policy = load_causal_lm(policy_path, key=f"{key}.policy", **load)
    reference = load_causal_lm(str(ref_path), key=f"{key}.reference", **load) if ref_path is not None else None
    check_same_vocabulary(policy, reference, key)
    return policy, reference, tok, float(spec["beta"])


def check_same_vocabulary(policy, reference, key: str) -> None:
    """The reference must score the policy's token ids: the same vocabulary size (ValueError naming `key`)."""
    if reference is None:
        return
    a, b = policy.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0]
    if a != b:
        raise ValueError(
            f"{key}.reference: its vocabulary ({b} ids) is not the policy's ({a} ids); the log-ratio needs the "
            "reference the policy was trained against, which shares its tokenizer"
        )
