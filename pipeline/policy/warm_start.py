"""The warm start of the tiny policy: a random-init causal LM fine-tuned on (prompt, response) pairs, loss on
the response tokens only, resumable from its own checkpoints; and the response-only batching helpers the
alignment stage's perplexities reuse.

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

May import: pipeline leaves only.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.io import atomic_write_json
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
        from pipeline.checkpoints import last_complete_checkpoint

        last = last_complete_checkpoint(checkpoint_dir, required=(WARM_START_STATE,))
        if last is not None:
            state = torch.load(Path(last) / WARM_START_STATE, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            order, start = state["order"], state["step"]
            say("policy", f"warm-start policy: resuming from {last} (step {start} of {steps})")
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
    from pipeline.checkpoints import CHECKPOINT_COMPLETE, list_checkpoints

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
