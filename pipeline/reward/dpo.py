"""The reward stage's `dpo` method: a policy trained by TRL's DPOTrainer on the run's training pairs, saved like an
RM so that calibration reads it as an implicit reward model, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

It starts from, and is referenced against, the policy stage's base policy (DIR/policy/, `pipeline.policy.stage`):
the model the align stage starts from too, so the DPO policy is judged beside RM + best-of-n / RJS / PPO / RLOO
from the same start. The pairs are the multitask RM's: every source's TRAIN split, concatenated and shuffled
(`pipeline.data.mix`, strategy concat), so calibration's overlap guard (train_prompts.json) applies unchanged.
A text pair is (prompt, chosen, rejected) in the plain layout; a conversational pair, when the policy has a
chat template, goes to TRL as messages (TRL renders it with the template and appends no EOS); TRL appends the
EOS to text completions. Full fine-tuning in float32 on CPU (TRL's DPOConfig: loss_type sigmoid, reverse KL,
truncation_mode keep_start, the reference model loaded from DIR/policy/ next to the policy: two models at once).

DIR/reward/dpo/ holds the policy (model + tokenizer), README.md (a model card), train_log.json,
train_prompts.json, reward_info.json, fingerprint.json (`plan_dpo`: the reward.dpo settings, the training rows,
the policy's tokenizer and the base policy's weights, the seed, the world size) and `implicit.json`, the
implicit RM's descriptor: {"policy": "reward/dpo", "reference": "policy" (the run's DIR/policy/, or the named
model), "beta": beta}, paths relative to the run directory. Its index entry says "kind": "implicit". An
interrupted DPO run restarts from its first step (no mid-run checkpoints).

May import: pipeline leaves, `pipeline.policy.stage` (DIR/policy/) and `pipeline.reward.{config, fingerprint}`.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.io import atomic_write_json, atomic_write_text, file_records, inside, remove_tree, sha256_json
from pipeline.logs import attach_progress
from pipeline.reward.fingerprint import (
    FINGERPRINT,
    TRAINING_CODE_VERSION,
    RMPlan,
    _dataset_sha256,
    _tokenizer_sha256,
    base_model_record,
    checkpoint_dir,
)


IMPLICIT = "implicit.json"  # the implicit RM's descriptor, inside its directory
KIND = "implicit"  # the index entry's "kind" of an implicit RM


def dpo_train_rows(recipe, splits, sources: list[str]):
    """The training pairs: every source's train split, mixed as the multitask RM mixes them."""
    from pipeline.data import mix

    return mix(
        {s: splits[s]["train"] for s in sources},
        "concat",
        n_per_source=recipe.data.n_train_per_source,
        per_source_batch=recipe.data.per_source_batch,
        seed=recipe.seed,
    )


def dpo_examples(train, tokenizer) -> list[dict]:
    """TRL's preference rows for `train`: text (prompt, chosen, rejected), or messages for a conversational pair
    when the policy has a chat template. One ValueError when the two kinds mix (TRL takes one kind per dataset)."""
    from pipeline.data.render import decode_conversation, has_chat_template

    convs = train["conversation"] if "conversation" in train.column_names else [None] * len(train)
    templated = has_chat_template(tokenizer)
    rows = []
    for p, c, r, conv in zip(train["prompt"], train["chosen"], train["rejected"], convs):
        messages = decode_conversation(conv) if templated else None
        if messages is not None:
            rows.append({"prompt": messages["prompt"], "chosen": messages["chosen"], "rejected": messages["rejected"]})
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    if len({isinstance(row["prompt"], list) for row in rows}) > 1:
        raise ValueError(
            "reward.methods=dpo: the training pairs mix text and conversational rows, and TRL's DPOTrainer takes "
            "one kind per dataset. Fix: align.chat_template=none (every pair in the plain layout), or train dpo on "
            "conversational sources only"
        )
    return rows


def dpo_args(recipe, run_dir: Path, name: str) -> dict:
    """DPOConfig's arguments from reward.dpo (sigmoid loss, reverse KL, float32; CPU: use_cpu, no bf16)."""
    cfg = recipe.reward.dpo
    args = dict(
        output_dir=str(checkpoint_dir(run_dir, name)),
        beta=cfg.beta,
        loss_type=["sigmoid"],
        f_divergence_type="reverse_kl",
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the steps (transformers 5)
        lr_scheduler_type="linear",
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=recipe.seed,
        bf16=False,
        activation_checkpointing=False,  # TRL's DPOConfig turns it on; the tiny policies do not need it
    )
    if not torch.cuda.is_available():
        args["use_cpu"] = True
    return args


_NOT_FINGERPRINTED = frozenset({"output_dir", "logging_steps", "report_to", "disable_tqdm", "dataloader_num_workers"})


def plan_dpo(recipe, run_dir: Path, name: str, sources: list[str], splits) -> tuple[RMPlan, str, object]:
    """(the DPO RM's plan with its fingerprint, the base policy to start from, its tokenizer)."""
    from accelerate import PartialState

    from pipeline.policy.stage import read_policy

    policy, tok, stamp = read_policy(run_dir, trust_remote_code=recipe.align.trust_remote_code)
    train = dpo_train_rows(recipe, splits, sources)
    args = dpo_args(recipe, run_dir, name)
    inputs = {
        "training_code_version": TRAINING_CODE_VERSION,
        "method": "dpo",
        "sources": list(sources),
        "dpo": asdict(recipe.reward.dpo),
        "train_args": {k: v for k, v in sorted(args.items()) if k not in _NOT_FINGERPRINTED},
        "train_rows": len(train),
        "train_data_sha256": _dataset_sha256(train),
        "tokenizer_sha256": _tokenizer_sha256(tok),
        "policy": {"stamp": stamp, **base_model_record(policy)},
        "seed": recipe.seed,
        "world_size": PartialState().num_processes,
    }
    return RMPlan(name, "dpo", list(sources), train, args, inputs, sha256_json(inputs)), policy, tok


def load_causal_lm(path: str, trust_remote_code: bool = False):
    """The base policy as a float32 causal LM (the trained policy and its frozen reference are two copies)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)


def train_dpo(recipe, run_dir: Path, plan: RMPlan, policy: str, tokenizer, label: str = "") -> None:
    """Train the DPO policy of `plan` with TRL's DPOTrainer from `policy`, referenced against `policy`, and save it
    atomically to DIR/reward/<name>/ like an RM (model, tokenizer, card, logs, fingerprint, implicit.json)."""
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from pipeline.policy.stage import reference_of
    from pipeline.reward.index import rm_dir

    remote = recipe.align.trust_remote_code
    out = inside(run_dir, rm_dir(run_dir, plan.name))
    state = PartialState()
    set_seed(recipe.seed)
    model, reference = load_causal_lm(policy, remote), load_causal_lm(policy, remote)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=DPOConfig(**plan.args),
        train_dataset=Dataset.from_list(dpo_examples(plan.train, tokenizer)),
        processing_class=tokenizer,
    )
    attach_progress(trainer, f"reward {label or plan.name}")
    trainer.train()
    partial = inside(run_dir, out.with_name(f".{out.name}.partial"))
    if state.is_main_process:
        remove_tree(partial, run_dir)
    state.wait_for_everyone()
    trainer.save_model(str(partial))  # every rank (ZeRO-3 gathers)
    if state.is_main_process:
        _write_dpo_dir(recipe, plan, partial, out.name, tokenizer, trainer, reference_of(run_dir))
        remove_tree(out, run_dir)
        os.replace(partial, out)
        remove_tree(inside(run_dir, checkpoint_dir(run_dir, plan.name)), run_dir)
    state.wait_for_everyone()
    del trainer, model, reference


def _write_dpo_dir(recipe, plan: RMPlan, folder: Path, dirname: str, tokenizer, trainer, reference: str) -> None:
    """Everything but the weights: tokenizer, train_prompts.json, train_log.json, reward_info.json, implicit.json,
    README.md, and last the fingerprint with every file's record."""
    from pipeline.data.mixing import TRAIN_PROMPTS, train_prompts_record

    beta = recipe.reward.dpo.beta
    tokenizer.save_pretrained(folder)
    atomic_write_json(folder / TRAIN_PROMPTS, train_prompts_record(plan.train["prompt"]))
    atomic_write_json(folder / "train_log.json", trainer.state.log_history)
    atomic_write_json(
        folder / "reward_info.json",
        {
            "name": plan.name,
            "method": "dpo",
            "kind": KIND,
            "sources": plan.sources,
            "n_train_pairs": len(plan.train),
            "n_dpo_examples": len(trainer.train_dataset),
            "beta": beta,
            "max_length": recipe.reward.dpo.max_length,
            "truncation": "keep_start (TRL)",
        },
    )
    atomic_write_json(folder / IMPLICIT, {"policy": f"reward/{dirname}", "reference": reference, "beta": beta})
    atomic_write_text(folder / "README.md", _card(plan, reference, beta))
    files = file_records(folder, ["."])
    atomic_write_json(
        folder / FINGERPRINT,
        {"fingerprint": plan.fingerprint, "inputs": plan.inputs, "files": {str(Path(f)): r for f, r in files.items()}},
    )


def _card(plan: RMPlan, reference: str, beta: float) -> str:
    return f"""---
library_name: transformers
tags: [trl, dpo, implicit-reward-model]
---

# {plan.name}: a DPO policy, read as an implicit reward model

Trained with TRL's DPOTrainer (sigmoid loss, reverse KL, beta = {beta}) on {len(plan.train)} preference pairs of
the sources {", ".join(plan.sources)} (their train splits, concatenated and shuffled), starting from and
referenced against `{reference}` (relative to the run directory: the run's policy stage).

Its implicit reward of a response y to a prompt x is

    r(x, y) = {beta} * (log pi(y|x) - log pi_ref(y|x))

summed over the response tokens (TRL appends the EOS to text responses), with pi this model and pi_ref the
reference above; `implicit.json` names both and beta. The difference r(x, y_chosen) - r(x, y_rejected) is the
logit of the probability that y_chosen is preferred.
"""
