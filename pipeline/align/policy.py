"""The policy: the stage's base policy (built or named), loading and saving policies, and the tiny policy
for CPU work, a random-init causal LM warm-started on synthetic prompt/response pairs.

`build_base_policy` returns `align.model_name_or_path` (a save_pretrained directory or hub id) with its
tokenizer, or builds the tiny policy once per set of warm-start settings into DIR/align/base/policy (resumable
from DIR/align/base/.warm_start_checkpoints). `load_policy` loads any policy the stage writes (full models and
QLoRA adapter directories alike); `save_policy` writes one in Hugging Face format.

The alignment stage needs a policy whose samples look like answers (so an RM or the synthetic gold
reward can score them) but are of MIXED quality (so that best-of-n, rejection sampling and PPO have room
to raise the gold reward). `warm_start_policy` gets there in a few seconds: it builds
`pipeline.models.tiny_model(spec, tokenizer, task="causal_lm")` and fine-tunes it with a plain torch loop
on (prompt, response) pairs, loss on the response tokens only, EOS appended to every response so the
policy learns to stop. The pairs come from `pipeline.data.synthetic.synthetic_responses`, which draws
responses of varied quality, so the policy imitates that spread.

Tokenization matches generation: the prompt and the response are tokenized separately and concatenated
(the policy later generates response tokens after the prompt's tokens, so it must be trained on exactly
that split, not on the BPE of the joined text).

May import: pipeline leaves, `pipeline.reward.trainer` (its checkpoint markers), `pipeline.align.context` and
`pipeline.align.generate`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.align.context import AlignContext, plain, rerun_reason, why
from pipeline.io import atomic_dir, atomic_write_json, read_json, sha256_json
from pipeline.logs import progress_bar, say
from pipeline.models import TinyModelSpec, tiny_model


IGNORE_INDEX = -100


def response_mask_labels(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int | None, max_length: int
) -> tuple[list[int], list[int]]:
    """Join one prompt and its response into `(input_ids, labels)` for response-only causal-LM loss.

    The response gets `eos_id` appended (unless it already ends with it, or `eos_id` is None); the
    labels are `IGNORE_INDEX` on the prompt tokens and equal to the input ids on the response tokens.
    Over-long examples lose tokens from the LEFT of the prompt first; if the response alone is longer
    than `max_length`, its end is cut (keeping the start the policy must learn to begin with).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    response = list(response_ids)
    if eos_id is not None and (not response or response[-1] != eos_id):
        response.append(eos_id)
    if len(response) >= max_length:
        # keep at least one prompt token so the first response token has a context to be predicted from
        response = response[: max_length - 1]
    keep_prompt = max_length - len(response)
    prompt = list(prompt_ids)[-keep_prompt:] if keep_prompt > 0 else []
    input_ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    return input_ids, labels


def collate_right(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `(input_ids, labels)` examples into a batch (pad labels are `IGNORE_INDEX`)."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        labels[i, : len(lab)] = torch.as_tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the labelled (response) positions."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def warm_start_policy(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    spec: TinyModelSpec | None = None,
    steps: int = 150,
    lr: float = 5e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
    model: torch.nn.Module | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    save_every: int = 0,
) -> torch.nn.Module:
    """Build a tiny causal LM (or take `model`) and train it on `(prompt, response)` pairs.

    `prompts[i]` and `responses[i]` form one example; a prompt may appear several times with different
    responses. The loss is on response tokens (+ the appended EOS) only. Returns the model in eval mode.

    With `checkpoint_dir` and `save_every > 0`, the whole loop state (weights, optimizer, schedule, example
    order, RNG states) is saved to `checkpoint_dir/checkpoint-<step>/` every `save_every` steps, marked
    complete last (the reward trainer's `checkpoint_complete.json`); a call with the same arguments resumes
    from the newest complete one and ends with the same weights as an uninterrupted run. The caller owns
    the directory (it must hold only checkpoints of the same inputs) and deletes it when done.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"warm_start_policy: {len(prompts)} prompts but {len(responses)} responses; pass parallel lists"
        )
    if not prompts:
        raise ValueError("warm_start_policy: no (prompt, response) pairs given")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "warm_start_policy: the tokenizer needs a pad and an EOS token (see pipeline.models.load_tokenizer)"
        )
    if model is None:
        model = tiny_model(spec or TinyModelSpec(arch="gpt_neox"), tokenizer, task="causal_lm", seed=seed)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    examples = [response_mask_labels(p, r, tokenizer.eos_token_id, max_length) for p, r in zip(p_ids, r_ids)]

    device = next(model.parameters()).device
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / max(1, steps))
    )
    order: list[int] = []
    start = 0
    if checkpoint_dir is not None and save_every > 0:
        from pipeline.reward.checkpoints import last_complete_checkpoint

        last = last_complete_checkpoint(checkpoint_dir, required=(WARM_START_STATE,))
        if last is not None:
            state = torch.load(Path(last) / WARM_START_STATE, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            order, start = state["order"], state["step"]
            say("align", f"warm-start policy: resuming from {last} (step {start} of {steps})")
    model.train()
    bar = progress_bar(range(start, steps), total=steps, initial=start, desc="warm-start policy", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch_idx, order = order[:batch_size], order[batch_size:]
        batch = collate_right([examples[i] for i in batch_idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = response_nll(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint_dir is not None and save_every > 0 and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_warm_start(Path(checkpoint_dir), step + 1, model, optimizer, schedule, rng, order)
    model.eval()
    return model


WARM_START_STATE = "warm_start_state.pt"


def _save_warm_start(folder: Path, step: int, model, optimizer, schedule, rng, order: list[int]) -> None:
    """checkpoint-<step>/ with the loop state, then its completion marker; older checkpoints are removed."""
    from pipeline.reward.checkpoints import CHECKPOINT_COMPLETE, list_checkpoints

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "order": list(order),
        "step": step,
    }
    tmp = ckpt / f".{WARM_START_STATE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / WARM_START_STATE)
    atomic_write_json(ckpt / CHECKPOINT_COMPLETE, {"global_step": step})
    for old in list_checkpoints(folder)[1:]:
        shutil.rmtree(old, ignore_errors=True)


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


# ---------------------------------------------------------------------------------------------------
# the stage's base policy


def build_base_policy(ctx: AlignContext) -> tuple[str, object, str]:
    """Path of the base policy, its tokenizer, and a stamp of what built it (downstream caches key on it).

    The tiny synthetic policy is built once per set of warm-start settings, atomically; changing any of
    them rebuilds it (and so re-samples every candidate that came from it).
    """
    from pipeline.data.render import check_tokenizer_templates, set_chat_template
    from pipeline.models import load_tokenizer

    cfg = ctx.cfg
    if cfg.model_name_or_path:
        tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        if cfg.chat_template is None:  # the tokenizer's own template is used: checked like a recipe's
            source = f"align.model_name_or_path ({cfg.model_name_or_path})"
            check_tokenizer_templates(tok.chat_template, source, "align.chat_template")
        set_chat_template(tok, cfg.chat_template, where="align.chat_template")
        stamp = [cfg.model_name_or_path, tok.chat_template] if tok.chat_template else cfg.model_name_or_path
        return cfg.model_name_or_path, tok, sha256_json(stamp)[:16]
    path = ctx.dir / "base" / "policy"
    stamp = sha256_json(plain(_tiny_policy_settings(ctx)))[:16]
    stamp_file = ctx.dir / "base" / "policy.settings.json"
    if ctx.main and (reason := rerun_reason(stamp_file, stamp, path / "config.json")):
        ctx.log(f"building the tiny base policy (warm start on synthetic responses of mixed quality){why(reason)}")
        _build_tiny_policy(ctx, path, stamp, stamp_file)
    ctx.barrier()
    return str(path), load_tokenizer(str(path)), stamp


def _tiny_policy_settings(ctx: AlignContext) -> dict:
    """Everything the tiny base policy is built from."""
    cfg = ctx.cfg
    return {
        "synthetic": ctx.recipe.data.synthetic,
        "vocab": cfg.policy_vocab_size,
        "arch": cfg.policy_arch,
        "size": cfg.policy_size,
        "steps": cfg.warm_start_steps,
        "lr": cfg.warm_start_lr,
        "batch": cfg.warm_start_batch_size,
        "prompts": cfg.warm_start_prompts,
        "responses": cfg.warm_start_responses,
        "seed": ctx.seed,
        "max_length": min(256, cfg.max_prompt_length + cfg.max_new_tokens),
        **({"chat_template": cfg.chat_template} if cfg.chat_template else {}),
    }


def _build_tiny_policy(ctx: AlignContext, path: Path, stamp: str, stamp_file: Path) -> None:
    """Warm-start the tiny policy on the synthetic benchmark and save it (with its tokenizer) to `path`,
    atomically, then its `stamp` to `stamp_file`; resumable from DIR/align/base/.warm_start_checkpoints while
    the settings stay `stamp`."""
    from pipeline.data.render import chat_template_text
    from pipeline.data.synthetic import synthetic_corpus, synthetic_prompts, synthetic_responses
    from pipeline.models import tiny_tokenizer

    cfg = ctx.cfg
    template = (
        None if cfg.chat_template is None else chat_template_text(cfg.chat_template, where="align.chat_template")
    )
    tok = tiny_tokenizer(
        synthetic_corpus(ctx.recipe.data.synthetic), vocab_size=cfg.policy_vocab_size, chat_template=template
    )
    prompts = synthetic_prompts(cfg.warm_start_prompts, seed=ctx.seed, split="train")
    P, R = [], []
    for p in prompts:
        for r in synthetic_responses(p, cfg.warm_start_responses, seed=ctx.seed):
            if template:  # warm-start on the templated dialogue, so the policy learns the template's turns
                q, r = _templated_warm_start(tok, p, r)
                P.append(q)
            else:
                P.append(p)
            R.append(r)
    ckpt_dir = ctx.dir / "base" / ".warm_start_checkpoints"
    if read_json(ckpt_dir / "settings.json") != stamp:  # checkpoints of other settings
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    atomic_write_json(ckpt_dir / "settings.json", stamp)
    model = warm_start_policy(
        tok,
        P,
        R,
        spec=TinyModelSpec(arch=cfg.policy_arch, size=cfg.policy_size),
        steps=cfg.warm_start_steps,
        lr=cfg.warm_start_lr,
        batch_size=cfg.warm_start_batch_size,
        seed=ctx.seed,
        max_length=min(256, cfg.max_prompt_length + cfg.max_new_tokens),
        progress=cfg.progress,
        checkpoint_dir=ckpt_dir,
        save_every=cfg.warm_start_save_steps,
    )
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    atomic_write_json(stamp_file, stamp)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def _templated_warm_start(tok, prompt: str, response: str) -> tuple[str, str]:
    """A synthetic HH-layout (prompt, response) as the template's (generation prompt, assistant turn)."""
    from pipeline.data.render import plain_to_messages, render_response

    conv = json.dumps({"prompt": plain_to_messages(prompt)})
    p, c, _ = render_response(tok, prompt, response, conv)
    return p, c
