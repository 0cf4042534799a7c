"""The PPO training loop: `train_ppo` wires the math of `pipeline.align.ppo.functional` into steps, each its own
function: `_rollout` (sample and score), `_evaluate` (log-probs, values, reference log-probs), `_advantages`
(per-token rewards, GAE), `_ppo_epochs` (the clipped updates), `_step_stats` (statistics averaged over ranks),
and around them set-up, resume, step checkpoints and the final save.

Distributed (what the tests verify on 2 CPU processes with gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3): every
rank samples its own share of the prompts; gradients are averaged by DDP/DeepSpeed, so all ranks hold
identical weights after every step; logged statistics are averaged over ranks. Generation uses the bare
module (`accelerator.unwrap_model`); under DeepSpeed, TRL 1.16's `trl.models.utils.
unwrap_model_for_generation`, which under ZeRO-3 gathers the sharded parameters
(`deepspeed.zero.GatheredParameters`) and removes/restores ZeRO-3's hooks around `generate`. Under ZeRO-3
the reference (and a critic) are rebuilt from the config and loaded from the gathered weights, since
`from_config` already partitioned the policy; the reference gets its own inference engine
(`trl.models.utils.prepare_deepspeed`). Dropout is off throughout (the model stays in eval mode), so the
first PPO epoch starts at ratio 1.

CPU launch notes: on a CPU-only machine accelerate goes multi-process only with `Accelerator(cpu=True)`
(the default here); DeepSpeed on CPU needs `deepspeed.init_distributed(dist_backend="gloo")` and
`Accelerator(deepspeed_plugin=..., kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])` (see
tests/test_ppo_distributed.py). Outputs in `output_dir`: `ppo_log.jsonl` (one row per step), `ppo_config.json`,
`ppo_summary.json`, `policy/` (HF format + tokenizer + `value_model.safetensors`), and while running,
`checkpoint/` every `save_every` steps (a rerun resumes from it; it is removed when the run finishes).

Imports: numpy, torch, `pipeline.io`, `pipeline.logs`, `pipeline.align.generate` (inside `_encode_prompts`) and
the modules beside this one; accelerate, TRL and safetensors inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, remove_tree
from pipeline.logs import progress_bar, say

from .config import PPOConfig
from .functional import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    masked_mean,
    per_token_kl_rewards,
    position_ids_from_mask,
    response_mask_from_ids,
    whiten,
)
from .model import PolicyWithValue, _apply_lora, _backbone, _clone, _response_logprobs, _zero3_enabled


if TYPE_CHECKING:
    from accelerate import Accelerator


STAT_KEYS = ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approx_kl", "entropy")


def train_ppo(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    reward_fn: Callable[[list[str], list[str]], Sequence[float]],
    cfg: PPOConfig,
    output_dir: str | os.PathLike,
    *,
    ref_policy: nn.Module | None = None,
    accelerator=None,
    gold_fn: Callable[[list[str], list[str]], Sequence[float]] | None = None,
    add_special_tokens: bool | Sequence[bool] = True,
) -> dict:
    """Run PPO on `policy` (a causal LM) and save the result under `output_dir/policy` (HF format).

    `reward_fn(prompts, responses)` scores decoded responses (one float each). `gold_fn`, when given,
    is logged as `gold_mean` per step (e.g. the synthetic benchmark's gold reward). `ref_policy` defaults
    to a frozen deep copy of `policy` (or, with `cfg.use_peft`, the adapter-disabled policy).
    Writes `output_dir/ppo_log.jsonl` (one line per step, rewritten atomically every step),
    `output_dir/ppo_config.json`, `output_dir/ppo_summary.json`, and with `cfg.save_every` resumable
    checkpoints in `output_dir/checkpoint` (a rerun with the same output_dir resumes from it; a run whose
    `policy/` and summary exist is not redone). Returns the summary dict (with the per-step log).
    `add_special_tokens` (one flag, or one per prompt): False for prompts rendered by a chat template, which
    writes its own special tokens (a BOS-adding tokenizer would add a second BOS); prompts are encoded as the
    generation path encodes them (`pipeline.align.generate.encode_prompts`).
    """
    from accelerate import Accelerator

    output_dir = Path(output_dir)
    prompts = list(prompts)
    _check_inputs(prompts, tokenizer)
    # on a CPU-only box accelerate goes distributed (gloo) under torchrun only with cpu=True
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    summary_path = output_dir / "ppo_summary.json"
    if summary_path.exists() and (output_dir / "policy").is_dir():
        return json.loads(summary_path.read_text())

    run = _setup(policy, tokenizer, cfg, accelerator, ref_policy)
    ckpt_dir, log_path = output_dir / "checkpoint", output_dir / "ppo_log.jsonl"
    start_step, log = _resume(accelerator, ckpt_dir, log_path)
    if main:
        atomic_write_json(output_dir / "ppo_config.json", asdict(cfg))

    # prompts: a seeded order shared by all ranks, each rank takes its slice
    prompt_ids, n_trunc = _encode_prompts(tokenizer, prompts, cfg.max_prompt_length, add_special_tokens)
    if n_trunc and main:
        say("ppo", f"{n_trunc} prompts truncated from the left to {cfg.max_prompt_length} tokens")
    bar = progress_bar(
        range(start_step, cfg.num_steps),
        total=cfg.num_steps,
        initial=start_step,
        desc="ppo",
        disable=not (main and cfg.progress),
    )
    for step in bar:
        t0 = time.time()
        idx = _prompt_indices(step, len(prompts), cfg, accelerator.process_index, accelerator.num_processes)
        rollout = _rollout(run, [prompts[i] for i in idx], [prompt_ids[i] for i in idx], reward_fn, gold_fn, step)
        _evaluate(run, rollout)
        _advantages(cfg, rollout)
        stats = _ppo_epochs(run, rollout, step)
        row = {"step": step + 1, **_step_stats(run, rollout, stats)}
        row["seconds"] = round(time.time() - t0, 3)
        log.append(row)
        if main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
            bar.set_postfix(score=f"{row['raw_score_mean']:.3f}", kl=f"{row['kl_mean']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.num_steps:
            _save_checkpoint(accelerator, ckpt_dir, step + 1)
    return _finish(run, output_dir, log)


def _check_inputs(prompts: list[str], tokenizer) -> None:
    if not prompts:
        raise ValueError("train_ppo: no prompts given; the alignment prompt set is empty after filtering")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            "train_ppo: the policy tokenizer needs pad and EOS tokens (see pipeline.models.load_tokenizer)"
        )


# --------------------------------------------------------------------------------------------------
# Set-up and resume
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What every step of one `train_ppo` run works with."""

    cfg: PPOConfig
    accelerator: Accelerator
    model: nn.Module  # the PolicyWithValue, prepared by accelerate (DDP / DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # the trained parameters (for gradient clipping)
    ref_policy: nn.Module | None  # None with LoRA: the reference is the adapter-disabled policy
    tokenizer: object
    stop_ids: list[int]  # EOS, then the config's other stop ids

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _setup(policy: nn.Module, tokenizer, cfg: PPOConfig, accelerator: Accelerator, ref_policy) -> _Run:
    """The policy with its value function (and LoRA adapters), its optimizer, both prepared by accelerate, and the
    frozen reference (a copy of the initial policy; None with LoRA)."""
    torch.manual_seed(cfg.seed)
    critic = None
    if cfg.value_model == "critic":
        critic = _clone(_backbone(policy))
    if cfg.use_peft:
        if ref_policy is not None:
            raise ValueError(
                "train_ppo: with use_peft the reference is the adapter-disabled policy; do not pass ref_policy"
            )
        if not hasattr(policy, "disable_adapter"):
            policy = _apply_lora(policy, cfg)
    elif ref_policy is None:
        ref_policy = _clone(policy)
    if ref_policy is not None:
        ref_policy.eval().requires_grad_(False)
    model = PolicyWithValue(policy, cfg.value_model, critic)
    model.eval()  # no dropout anywhere: rollout and update log-probs must agree
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)

    _set_deepspeed_batch_size(accelerator, cfg.mini_batch_size, cfg.max_grad_norm or 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()
    if ref_policy is not None:
        ref_policy = _prepare_reference(ref_policy, accelerator)
    stop_ids = [tokenizer.eos_token_id] + [int(t) for t in cfg.stop_token_ids if int(t) != tokenizer.eos_token_id]
    return _Run(cfg, accelerator, model, optimizer, params, ref_policy, tokenizer, stop_ids)


def _prepare_reference(ref_policy: nn.Module, accelerator: Accelerator) -> nn.Module:
    """The frozen reference on the device; under DeepSpeed, in its own inference engine (TRL's `prepare_deepspeed`)."""
    if _is_deepspeed(accelerator):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(ref_policy, accelerator)
    return ref_policy.to(accelerator.device)


def _set_deepspeed_batch_size(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed wants a micro-batch size in its config; we have no dataloader for accelerate to read it from."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = micro_batch
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = micro_batch * ds["gradient_accumulation_steps"] * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # so that accelerator.get_state_dict can gather the final weights
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)


def _is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


@contextlib.contextmanager
def _unwrap_for_generation(model, accelerator):
    """The bare module for `generate`. Under DeepSpeed, TRL's `unwrap_model_for_generation` (TRL 1.16,
    trl/models/utils.py), which under ZeRO-3 gathers the sharded parameters with
    `deepspeed.zero.GatheredParameters` and removes/re-adds ZeRO-3's forward hooks around generation;
    otherwise (single process, DDP) `accelerator.unwrap_model` is all it takes (and TRL's import is skipped)."""
    if _is_deepspeed(accelerator):
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
    else:
        yield accelerator.unwrap_model(model)


def _resume(accelerator: Accelerator, ckpt_dir: Path, log_path: Path) -> tuple[int, list[dict]]:
    """The step to start from and the log of the steps before it: from the last checkpoint, if any."""
    if not (ckpt_dir / "state.json").exists():
        return 0, []
    state = json.loads((ckpt_dir / "state.json").read_text())
    accelerator.load_state(str(ckpt_dir / state["dir"]))
    start_step = state["step"]
    log = _read_log(log_path)[:start_step]
    say("ppo", f"resuming from step {start_step} ({ckpt_dir})")
    return start_step, log


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# One PPO step
# --------------------------------------------------------------------------------------------------


@dataclass
class _Rollout:
    """This rank's share of one step's rollout batch, and what the later steps compute from it."""

    prompts: list[str]
    input_ids: torch.Tensor  # [batch, prompt + response]: left-padded prompts, then the responses
    attn: torch.Tensor
    plen: int  # the padded prompt length: responses start there
    resp_mask: torch.Tensor  # real response tokens (up to and including the first stop id)
    has_eos: torch.Tensor
    scores: torch.Tensor  # reward_fn's score of each response
    gold: torch.Tensor | None  # gold_fn's, when given
    # 2. under the policy that sampled them, and the reference
    old_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    # 3-4. rewards and advantages
    kl: torch.Tensor | None = None
    adj_scores: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def _prompt_indices(step: int, n_prompts: int, cfg: PPOConfig, rank: int, world: int) -> list[int]:
    """This rank's prompts at `step`: a seeded order per epoch over the prompts, shared by all ranks, cut into
    global batches; each rank takes its slice. Fewer prompts than a global batch are repeated."""
    global_batch = cfg.rollout_batch_size * world
    per_epoch = max(1, n_prompts // global_batch)
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_prompts)
    if len(order) < global_batch:  # fewer prompts than a batch: repeat them
        order = np.resize(order, global_batch)
    chunk = order[within * global_batch : (within + 1) * global_batch]
    return chunk[rank * cfg.rollout_batch_size : (rank + 1) * cfg.rollout_batch_size].tolist()


def _rollout(run: _Run, prompts: list[str], prompt_ids: list[list[int]], reward_fn, gold_fn, step: int) -> _Rollout:
    """1. Sample one response per prompt (seeded by step and rank), cut it at the first stop id, and score the
    decoded responses with `reward_fn` (and `gold_fn`)."""
    cfg, tokenizer, device = run.cfg, run.tokenizer, run.device
    query, query_mask = _left_pad(prompt_ids, tokenizer.pad_token_id, device)
    plen = query.shape[1]
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + run.accelerator.process_index)
    with torch.no_grad(), _unwrap_for_generation(run.model, run.accelerator) as unwrapped:
        generated = unwrapped.policy.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=run.stop_ids,
        )
    response = generated[:, plen:]
    resp_mask, has_eos = response_mask_from_ids(response, run.stop_ids)
    response = torch.where(resp_mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = _decode(tokenizer, response, resp_mask, run.stop_ids)
    scores = _call_scorer(reward_fn, "reward_fn", prompts, texts).to(device)
    gold = _call_scorer(gold_fn, "gold_fn", prompts, texts) if gold_fn is not None else None
    return _Rollout(
        prompts=prompts,
        input_ids=torch.cat([query, response], dim=1),
        attn=torch.cat([query_mask, resp_mask], dim=1),
        plen=plen,
        resp_mask=resp_mask,
        has_eos=has_eos,
        scores=scores,
        gold=gold,
    )


@torch.no_grad()
def _evaluate(run: _Run, rollout: _Rollout) -> None:
    """2. One no-grad forward of the policy (per-token log-probs and values) and of the frozen reference
    (per-token log-probs) over the rollout, in mini-batches."""
    cfg, r = run.cfg, rollout
    old_logprobs, old_values, ref_logprobs = [], [], []
    for s in range(0, len(r.prompts), cfg.mini_batch_size):
        sl = slice(s, s + cfg.mini_batch_size)
        logits, values = run.model(r.input_ids[sl], r.attn[sl])
        lp, _ = _response_logprobs(logits, r.input_ids[sl], r.plen, cfg.temperature)
        old_logprobs.append(lp)
        old_values.append(values[:, r.plen - 1 : -1].float())
        ref_logprobs.append(
            _ref_logprobs(run.model, run.accelerator, run.ref_policy, r.input_ids[sl], r.attn[sl], r.plen, cfg)
        )
    r.old_logprobs = torch.cat(old_logprobs)
    r.old_values = torch.cat(old_values) * r.resp_mask
    r.ref_logprobs = torch.cat(ref_logprobs)


@torch.no_grad()
def _advantages(cfg: PPOConfig, rollout: _Rollout) -> None:
    """3-4. Per-token rewards (KL penalty, the score at the last token), optionally whitened keeping their mean;
    advantages by GAE, whitened; returns = advantages + values."""
    r = rollout
    rewards, r.kl, r.adj_scores = per_token_kl_rewards(
        r.old_logprobs, r.ref_logprobs, r.resp_mask, cfg.kl_coef, r.scores, cfg.missing_eos_penalty, r.has_eos
    )
    if cfg.whiten_rewards:
        rewards = whiten(rewards, r.resp_mask, shift_mean=False)
    advantages, r.returns = gae(rewards, r.old_values, r.resp_mask, cfg.gamma, cfg.lam)
    r.advantages = whiten(advantages, r.resp_mask, shift_mean=True)


def _ppo_epochs(run: _Run, rollout: _Rollout, step: int) -> dict[str, list[torch.Tensor]]:
    """5. `ppo_epochs` passes over shuffled mini-batches (a generator seeded by the step), one optimizer step
    each; returns each statistic of `STAT_KEYS` per mini-batch."""
    cfg = run.cfg
    stats = {k: [] for k in STAT_KEYS}
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    n = len(rollout.prompts)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, cfg.mini_batch_size):
            mb = torch.as_tensor(perm[s : s + cfg.mini_batch_size], device=run.device)
            for k, v in zip(stats, _update(run, rollout, mb)):
                stats[k].append(v.detach().float())
    return stats


def _update(run: _Run, rollout: _Rollout, mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step on the mini-batch `mb`: clipped policy loss + vf_coef * clipped value loss. Returns
    the statistics in the order of `STAT_KEYS`."""
    cfg, accelerator, r = run.cfg, run.accelerator, rollout
    m = r.resp_mask[mb]
    logits, values = run.model(r.input_ids[mb], r.attn[mb])
    lp, resp_logits = _response_logprobs(logits, r.input_ids[mb], r.plen, cfg.temperature)
    values = values[:, r.plen - 1 : -1].float()
    pg_loss, clipfrac, approx_kl = clipped_policy_loss(lp, r.old_logprobs[mb], r.advantages[mb], m, cfg.cliprange)
    vf_loss, vf_clipfrac = clipped_value_loss(values, r.old_values[mb], r.returns[mb], m, cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    accelerator.backward(loss)
    if accelerator.sync_gradients and cfg.max_grad_norm and not _is_deepspeed(accelerator):
        accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        ent = masked_mean(entropy_from_logits(resp_logits), m)
    return pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, ent


def _step_stats(run: _Run, rollout: _Rollout, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """6. The step's statistics, averaged over ranks (a collective: every rank calls it), sorted by name and
    rounded to 6 digits."""
    r, device = rollout, run.device
    local = {
        "score_mean": r.adj_scores.float().mean(),
        "raw_score_mean": r.scores.float().mean(),
        "kl_mean": r.kl.sum(1).mean(),
        "response_length": r.resp_mask.sum(1).float().mean(),
        "eos_fraction": r.has_eos.float().mean(),
        "advantage_mean_raw": masked_mean(r.returns - r.old_values, r.resp_mask),
        "value_mean": masked_mean(r.old_values, r.resp_mask),
        **{k: torch.stack(v).mean() for k, v in stats.items()},
    }
    if r.gold is not None:
        local["gold_mean"] = r.gold.float().mean().to(device)
    keys = sorted(local)
    reduced = run.accelerator.reduce(torch.stack([local[k].to(device).float() for k in keys]), reduction="mean")
    return {k: round(float(v), 6) for k, v in zip(keys, reduced.tolist())}


# --------------------------------------------------------------------------------------------------
# Helpers of the steps, checkpoints and the final save
# --------------------------------------------------------------------------------------------------


def _finish(run: _Run, output_dir: Path, log: list[dict]) -> dict:
    """Save the final policy (gathering its weights is collective: every rank takes part), write the summary and
    remove the checkpoints; returns the summary."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    policy_dir = output_dir / "policy"
    state_dict = accelerator.get_state_dict(run.model)  # gathers ZeRO-3 shards; collective, every rank calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        _save_policy(unwrapped, state_dict, run.tokenizer, policy_dir, run.cfg)
        summary = _summary(log, run.cfg, policy_dir)
        atomic_write_json(output_dir / "ppo_summary.json", summary)
        remove_tree(output_dir / "checkpoint", output_dir)  # the finished policy supersedes the checkpoints
    accelerator.wait_for_everyone()
    return _summary(log, run.cfg, policy_dir)


def _summary(log: list[dict], cfg: PPOConfig, policy_dir: Path) -> dict:
    def mean_of(key, rows):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    k = min(3, max(1, len(log) // 2))
    return {
        "policy_dir": str(policy_dir),
        "steps": len(log),
        "first_score_mean": mean_of("raw_score_mean", log[:k]),
        "last_score_mean": mean_of("raw_score_mean", log[-k:]),
        "first_gold_mean": mean_of("gold_mean", log[:k]),
        "last_gold_mean": mean_of("gold_mean", log[-k:]),
        "config": asdict(cfg),
        "log": log,
    }


def _call_scorer(fn, name: str, prompts: list[str], texts: list[str]) -> torch.Tensor:
    """Call a `(prompts, responses) -> scores` function; accept lists, numpy arrays or tensors."""
    out = fn(prompts, texts)
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    scores = torch.as_tensor(np.asarray(out, dtype=np.float64), dtype=torch.float32)
    if scores.shape != (len(texts),):
        raise ValueError(
            f"train_ppo: {name} returned shape {tuple(scores.shape)} for {len(texts)} responses; "
            "it must return one float per (prompt, response)"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"train_ppo: {name} returned non-finite scores: {scores.tolist()}")
    return scores


def _ref_logprobs(model, accelerator, ref_policy, input_ids, attn, plen, cfg):
    pos = position_ids_from_mask(attn)
    if ref_policy is None:  # LoRA: the reference is the same network with its adapter disabled
        policy = accelerator.unwrap_model(model).policy
        with policy.disable_adapter():
            logits = policy(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits
    else:
        logits = ref_policy(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits
    lp, _ = _response_logprobs(logits, input_ids, plen, cfg.temperature)
    return lp


def _encode_prompts(tokenizer, prompts, max_length, add_special_tokens: bool | Sequence[bool] = True):
    """(ids, how many prompts were cut): the generation path's encoding (`encode_prompts`: special tokens only
    for prompts not rendered by a chat template, left truncation keeping a leading BOS), so PPO's rollouts start
    from the token ids the candidates were sampled from."""
    from pipeline.align.generate import encode_prompts

    if not isinstance(add_special_tokens, bool) and len(add_special_tokens) != len(prompts):
        raise ValueError(f"train_ppo: {len(add_special_tokens)} add_special_tokens flags for {len(prompts)} prompts")
    full = encode_prompts(tokenizer, prompts, None, add_special_tokens)
    ids = encode_prompts(tokenizer, prompts, max_length, add_special_tokens)
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"train_ppo: prompt #{empty[0]} tokenizes to nothing; drop empty prompts")
    return ids, sum(len(a) != len(b) for a, b in zip(full, ids))


def _left_pad(seqs, pad_id, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _decode(tokenizer, response, mask, eos_id) -> list[str]:
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    out = []
    for row, m in zip(response.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(row, m) if keep and t not in stops]
        out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


def _save_checkpoint(accelerator, ckpt_dir: Path, step: int) -> None:
    """Accelerate state (model, optimizer, RNG) of `step` into a fresh folder, then `state.json` (written
    atomically) points at it, then older folders go: a crash at any moment leaves a usable checkpoint."""
    name = f"step-{step:06d}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt_dir / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(ckpt_dir / "state.json", {"step": step, "dir": name})
        for old in ckpt_dir.glob("step-*"):
            if old.name != name:
                remove_tree(old, ckpt_dir)
    accelerator.wait_for_everyone()


def _save_policy(unwrapped: PolicyWithValue, state_dict: dict, tokenizer, policy_dir: Path, cfg: PPOConfig) -> None:
    """Save the policy as a plain HF causal LM (LoRA merged; under ZeRO-3 the LoRA adapter) + tokenizer,
    and the value head (and critic) alongside in value_model.safetensors."""
    from safetensors.torch import save_file

    policy_sd = {k[len("policy.") :]: v for k, v in state_dict.items() if k.startswith("policy.")}
    value_sd = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("policy.")}
    policy = unwrapped.policy
    with atomic_dir(policy_dir) as tmp:
        if cfg.use_peft and _zero3_enabled():
            # the module's parameters are ZeRO-3 shards here (gathering them is collective, and this runs
            # on the main process only): save the adapter from the gathered state dict instead of merging
            policy.save_pretrained(tmp, state_dict=policy_sd)
        elif cfg.use_peft:
            merged = policy.merge_and_unload()  # plain causal LM; the trained weights are already in place
            merged.save_pretrained(tmp)
        else:
            policy.save_pretrained(tmp, state_dict=policy_sd)
        tokenizer.save_pretrained(tmp)
        save_file(value_sd, str(Path(tmp) / "value_model.safetensors"))
