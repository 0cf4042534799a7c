"""The trainers behind the alignment methods that train a policy (`pipeline.align.methods` runs them):

* rejection sampling fine-tuning (the paper's RJS, `run_rjs`): TRL `SFTTrainer` on each prompt's best
  candidate, in TRL's prompt/completion format with `completion_only_loss=True` (loss on the response tokens
  and the EOS only); full fine-tuning, LoRA, or QLoRA (4-bit NF4 base via bitsandbytes + LoRA) through peft.
* RLOO (`run_rloo`): TRL's `RLOOTrainer` with the RM as a custom reward function (it receives decoded
  completions, so the RM's own tokenizer is used); on the synthetic benchmark the gold reward is a second
  reward function with weight 0: logged (`rewards/gold/mean`), never optimized.
* PPO (`run_ppo`): this project's `pipeline.align.ppo.train_ppo`.

Each writes its policy to `out_dir/policy` in Hugging Face format (`save_pretrained`; LoRA merged into the
base, a QLoRA policy is its adapter directory, which `pipeline.align.policy.load_policy` loads either way) and
its log to `out_dir/train_log.json`.

May import: pipeline leaves, `pipeline.align.{policy, rewards, ppo}`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.align.policy import load_policy, save_policy
from pipeline.io import atomic_write_json, remove_tree
from pipeline.logs import attach_progress, say


PEFT_MODES = ("none", "lora", "qlora")


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
            say("align", f"resuming from {ckpt}")
            return str(ckpt)
        say("align", f"skipping incomplete checkpoint {ckpt} (no trainer_state.json); deleting it")
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
    add_special_tokens: bool | Sequence[bool] = True,
) -> dict:
    """`train_ppo` on a fresh copy of the policy; it writes `out_dir/policy`, logs and a summary.
    `add_special_tokens`: False for the prompts a chat template rendered (see `train_ppo`)."""
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
    summary = train_ppo(
        policy,
        tokenizer,
        list(prompts),
        on_raw(reward_fn),
        cfg,
        out_dir,
        gold_fn=on_raw(gold_fn),
        add_special_tokens=add_special_tokens,
    )
    if not (out_dir / "policy" / "config.json").exists() and not (out_dir / "policy" / "adapter_config.json").exists():
        raise RuntimeError(f"train_ppo finished without writing {out_dir / 'policy'}")
    from accelerate import PartialState

    if PartialState().is_main_process and not (out_dir / "policy" / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(out_dir / "policy")
    return summary
