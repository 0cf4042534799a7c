"""The alignment methods (`align.method`): best-of-n, rejection-sampling fine-tuning, RLOO, PPO.

Each takes a policy (or the candidates it sampled) and a reward function
`reward(prompts, responses) -> np.ndarray` (an `RMReward`, cross-tokenizer), and writes what it
produced into a directory the stage then publishes atomically:

* `best_of_n`: nothing is trained. For each prompt the RM picks the best of the n candidates; the
  records (prompt, candidates, scores, chosen index) are the result (`samples.jsonl`).
* `rjs` (rejection sampling, the paper's RJS): TRL `SFTTrainer` on each prompt's best candidate, in
  TRL's prompt/completion format with `completion_only_loss=True` (loss on the response tokens and the
  EOS only); full fine-tuning, LoRA, or QLoRA (4-bit NF4 base via bitsandbytes + LoRA) through peft.
* `rloo`: TRL's `RLOOTrainer` with the RM as a custom reward function (it receives decoded
  completions, so the RM's own tokenizer is used); on the synthetic benchmark the gold reward is a
  second reward function with weight 0: logged (`rewards/gold/mean`), never optimized.
* `ppo`: this project's `pipeline.align.ppo.train_ppo`.

Policies are written in Hugging Face format (`save_pretrained`); a QLoRA policy is its adapter
directory (adapter_config.json points at the base), which `load_policy` loads either way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_write_json, atomic_write_text, remove_tree
from pipeline.logs import attach_progress


PEFT_MODES = ("none", "lora", "qlora")


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


def peft_config(mode: str, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """None for full fine-tuning, else a causal-LM LoRA config (QLoRA = the same on a 4-bit base)."""
    if mode not in PEFT_MODES:
        raise ValueError(f"unknown align.peft {mode!r}: use one of {', '.join(PEFT_MODES)}")
    if mode == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )


# ---------------------------------------------------------------------------------------------------
# best-of-n


def best_of_n_records(
    prompts: Sequence[str], candidates: Sequence[Sequence[str]], scores: np.ndarray, ended=None
) -> list[dict]:
    """One record per prompt: prompt, candidates, their scores and the index of the best (first on ties)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(prompts), len(candidates[0]) if len(candidates) else 0):
        raise ValueError(f"best_of_n: scores of shape {scores.shape} for {len(prompts)} prompts x n candidates")
    out = []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        row = scores[i]
        chosen = int(np.nanargmax(row)) if not np.all(np.isnan(row)) else 0
        rec = {"prompt": p, "candidates": list(cands), "scores": [float(x) for x in row], "chosen": chosen}
        if ended is not None:
            rec["ended"] = [bool(e) for e in ended[i]]
        out.append(rec)
    return out


def score_candidates(reward_fn, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
    """RM scores of every candidate, shape (prompts, n), with one batched call."""
    n = len(candidates[0]) if candidates else 0
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_r = [c for cs in candidates for c in cs]
    return np.asarray(reward_fn(flat_p, flat_r), dtype=np.float64).reshape(len(prompts), n)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON line ({e}); delete the file to regenerate it"
                ) from e
    return out


# ---------------------------------------------------------------------------------------------------
# rejection sampling fine-tuning (SFT on the best samples)


def truncate_prompt_left(tokenizer, prompt: str, completion: str, max_length: int) -> str:
    """`prompt` with its oldest tokens dropped so that prompt + completion (+ EOS) fit in `max_length` tokens.

    The completion is kept whole when it fits (TRL's own truncation keeps the START of a sequence, which
    would cut the response instead).
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    budget = max_length - len(c) - 1 - tokenizer.num_special_tokens_to_add(pair=False)
    if len(p) <= budget:
        return prompt
    keep = max(budget, 1)
    return tokenizer.decode(p[len(p) - keep :], skip_special_tokens=False)


def rjs_dataset(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int):
    """TRL's prompt/completion dataset of the chosen samples (prompt left-truncated to fit)."""
    from datasets import Dataset

    if not prompts:
        raise ValueError("rejection sampling: no samples to fine-tune on (the prompt set is empty)")
    rows = [
        {"prompt": truncate_prompt_left(tokenizer, p, c, max_length), "completion": c}
        for p, c in zip(prompts, completions)
    ]
    return Dataset.from_list(rows)


def sft_config(
    output_dir: Path,
    *,
    batch_size: int,
    micro_batch_size: int,
    learning_rate: float,
    lr_scheduler: str,
    warmup_ratio: float,
    epochs: float,
    max_length: int,
    seed: int,
    logging_steps: int = 1,
    max_steps: int = -1,
    save_steps: int = 0,
):
    """TRL SFTConfig for RJS: completion-only loss, global batch `batch_size` (accumulation fills it).

    `save_steps > 0` keeps one resumable checkpoint in `output_dir` (`run_rjs` resumes from it)."""
    from trl import SFTConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = max(1, min(micro_batch_size, batch_size))
    accumulation = max(1, math.ceil(batch_size / (micro * world)))
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=epochs,
        max_steps=max_steps,
        max_length=max_length,
        completion_only_loss=True,
        packing=False,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        use_cpu=not cuda,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_total_limit=1,
        report_to="none",
        seed=seed,
        disable_tqdm=True,  # pipeline.logs' progress lines instead (a log file gets 10 lines, not thousands)
        dataloader_num_workers=0,
        activation_checkpointing=True,  # TRL's default, under the name that does not warn in transformers 5
    )


def run_rjs(
    policy_path: str,
    tokenizer,
    dataset,
    args,
    out_dir: Path,
    *,
    peft: str = "none",
    lora: dict | None = None,
    trust_remote_code: bool = False,
) -> list[dict]:
    """Fine-tune the policy at `policy_path` on `dataset` and save the result to `out_dir/policy`.

    Full and LoRA runs save a full model (LoRA merged into the base); QLoRA saves its adapter. Returns
    the Trainer's log history (also written to `out_dir/train_log.json`).
    """
    from trl import SFTTrainer

    pcfg = peft_config(peft, **(lora or {}))
    model = load_policy(
        policy_path,
        dtype="auto" if peft != "qlora" else torch.bfloat16,
        bits=4 if peft == "qlora" else None,
        trust_remote_code=trust_remote_code,
    )
    if peft == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=pcfg)
    attach_progress(trainer, "rjs fine-tuning")
    trainer.train(resume_from_checkpoint=_last_complete_trainer_checkpoint(Path(args.output_dir)))
    return _save_trained_policy(trainer, out_dir, policy_path, tokenizer, peft, trust_remote_code)


def _last_complete_trainer_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N an interrupted run left that holds trainer_state.json (the Trainer writes it
    after the weights, optimizer and RNG state); newer half-written ones (a crash or a full disk while
    saving) are deleted, saying so, instead of failing every rerun."""
    import re

    found = sorted(
        (
            (int(m.group(1)), p)
            for p in folder.glob("checkpoint-*")
            if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
        ),
        reverse=True,
    )
    for _, ckpt in found:
        if (ckpt / "trainer_state.json").is_file():
            print(f"[align] resuming from {ckpt}")
            return str(ckpt)
        print(f"[align] skipping incomplete checkpoint {ckpt} (no trainer_state.json); deleting it")
        remove_tree(ckpt, folder)
    return None


# ---------------------------------------------------------------------------------------------------
# RLOO (TRL)


RLOO_DEFAULTS = dict(
    learning_rate=1e-6,
    max_steps=100,
    per_device_train_batch_size=8,  # completions per device per step (a multiple of num_generations)
    beta=0.05,
    logging_steps=1,
)


def run_rloo(
    policy_path: str,
    tokenizer,
    prompts: Sequence[str],
    raw_prompts: Sequence[str],
    reward_fn,
    out_dir: Path,
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    overrides: dict | None = None,
    gold_fn=None,
    peft: str = "none",
    lora: dict | None = None,
    trust_remote_code: bool = False,
    stop_token_ids=(),
) -> list[dict]:
    """TRL RLOOTrainer with `reward_fn` (scored on the raw dataset prompts); saves `out_dir/policy`.
    `stop_token_ids` (a chat template's end-of-turn token) end completions like EOS (TRL reads the stop ids
    from the policy's generation config)."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from pipeline.align.rewards import as_trl_reward

    if n < 2:
        raise ValueError("rloo needs at least 2 generations per prompt (align.n >= 2): the baseline is leave-one-out")
    cuda = torch.cuda.is_available()
    kw = dict(RLOO_DEFAULTS, disable_tqdm=True)  # pipeline.logs' progress instead (attach_progress below)
    kw["per_device_train_batch_size"] = max(n, (kw["per_device_train_batch_size"] // n) * n)
    kw.update(overrides or {})
    if "gradient_checkpointing" not in kw:  # TRL's default (on), under the name that does not warn
        kw.setdefault("activation_checkpointing", True)
    funcs, weights = [as_trl_reward(reward_fn, "rm")], [1.0]
    if gold_fn is not None:
        funcs.append(as_trl_reward(gold_fn, "gold"))
        weights.append(0.0)  # logged, not optimized
    args = RLOOConfig(
        output_dir=str(out_dir / ".trainer"),
        num_generations=n,
        max_completion_length=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        reward_weights=weights,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        seed=seed,
        **kw,
    )
    dataset = Dataset.from_dict({"prompt": list(prompts), "raw_prompt": list(raw_prompts)})
    model = load_policy(
        policy_path,
        dtype="auto" if peft != "qlora" else torch.bfloat16,
        bits=4 if peft == "qlora" else None,
        trust_remote_code=trust_remote_code,
    )
    if stop_token_ids:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        eos = eos or [tokenizer.eos_token_id]
        model.generation_config.eos_token_id = eos + [int(t) for t in stop_token_ids if int(t) not in eos]
    tokenizer.padding_side = "left"
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(peft, **(lora or {})),
    )
    attach_progress(trainer, "rloo")
    trainer.train()
    return _save_trained_policy(
        trainer, out_dir, policy_path, tokenizer, peft, trust_remote_code, cleanup=out_dir / ".trainer"
    )


def _save_trained_policy(
    trainer,
    out_dir: Path,
    policy_path: str,
    tokenizer,
    peft: str,
    trust_remote_code: bool,
    cleanup: Path | None = None,
) -> list:
    """Save a TRL trainer's policy to out_dir/policy (LoRA merged into the base; QLoRA keeps its adapter)
    and its log to out_dir/train_log.json; every rank calls it (ZeRO-3 gathers), the main process writes."""
    from accelerate import PartialState

    state = PartialState()
    policy_dir = out_dir / "policy"
    if peft == "lora":
        adapter_dir = out_dir / ".adapter"
        trainer.save_model(str(adapter_dir))
        if state.is_main_process:
            from peft import PeftModel

            base = load_policy(policy_path, dtype="auto", trust_remote_code=trust_remote_code)
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
            save_policy(merged, tokenizer, policy_dir)
            remove_tree(adapter_dir, out_dir)
    else:
        trainer.save_model(str(policy_dir))
        if state.is_main_process:
            tokenizer.save_pretrained(policy_dir)
    log = trainer.state.log_history
    if state.is_main_process:
        atomic_write_json(out_dir / "train_log.json", log)
        if cleanup is not None:
            remove_tree(cleanup, out_dir)
    state.wait_for_everyone()
    return log


# ---------------------------------------------------------------------------------------------------
# PPO (this project's trainer)


def run_ppo(
    policy_path: str,
    tokenizer,
    prompts: Sequence[str],
    raw_prompts: Sequence[str],
    reward_fn,
    out_dir: Path,
    *,
    overrides: dict,
    defaults: dict,
    gold_fn=None,
    trust_remote_code: bool = False,
) -> dict:
    """`train_ppo` on a fresh copy of the policy; it writes `out_dir/policy`, logs and a summary."""
    from pipeline.align.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(**{**defaults, **(overrides or {})})
    to_raw = dict(zip(prompts, raw_prompts))

    def on_raw(fn):
        if fn is None:
            return None

        def scored(ps, rs):
            return fn([to_raw.get(p, p) for p in ps], rs)

        return scored

    policy = load_policy(policy_path, dtype="auto", trust_remote_code=trust_remote_code)
    summary = train_ppo(policy, tokenizer, list(prompts), on_raw(reward_fn), cfg, out_dir, gold_fn=on_raw(gold_fn))
    if not (out_dir / "policy" / "config.json").exists() and not (out_dir / "policy" / "adapter_config.json").exists():
        raise RuntimeError(f"train_ppo finished without writing {out_dir / 'policy'}")
    from accelerate import PartialState

    if PartialState().is_main_process and not (out_dir / "policy" / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(out_dir / "policy")
    return summary
