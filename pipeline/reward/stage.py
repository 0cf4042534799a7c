"""The reward stage: train one reward model per requested method and write DIR/reward/.

For every RM name (`more`, `multitask`, `uniform`, `single-<source>`), the stage mixes the sources
(balanced blocks for more/uniform, a shuffled concatenation for multitask), trains a
`MORERewardTrainer`, and saves `DIR/reward/<name>/` (model, tokenizer, model card, train_log.json)
atomically, with `fingerprint.json`: a hash of everything that determines the RM (its training settings,
the reward section, the training rows actually used, the tokenizer with its chat template text, the base
model's config and weight CONTENT (sha256) or hub revision, the seed, the world size) and the size and
sha256 of every file written. A name that is not a safe path component (a `group_by` source `src/a/b`, a
name with `..` or NUL) gets the directory `pipeline.io.safe_component(name)` (a slug plus a hash), and every
path is checked to lie inside the run directory before it is written or deleted. A finished RM is reused only when its fingerprint
matches and its files are intact; otherwise it is retrained and the log says why (`force=True`, i.e.
`--force reward`, retrains every RM). An interrupted RM resumes from its last COMPLETE Trainer checkpoint in
`DIR/reward/.checkpoints/<name>/` (one whose fingerprint matches; incomplete ones are deleted, and the log
says which checkpoint it resumes from). `DIR/reward/index.json` lists what was trained, with paths
relative to the run directory, so a copied or moved run directory stays self-contained. Each RM directory
holds `train_prompts.json` (the hashes of the prompts it was trained on, `pipeline.data.mixing.prompt_hash`;
calibration uses it to count and exclude evaluation pairs the RM has seen), and `DIR/reward/data_stats.json`
holds every source's pairs per split, the records read and the pairs dropped on loading, by reason (also
printed), and each RM's count of over-length (left-truncated) training pairs.

The `dpo` method (`pipeline.reward.dpo`) trains a policy instead, with TRL's DPOTrainer from the policy stage's
base policy (DIR/policy/), saved the same way plus implicit.json; its index entry has "kind": "implicit".

Where the parts live: the section's dataclass and names in `pipeline.reward.config`, the fingerprints and why
a saved RM is stale in `pipeline.reward.fingerprint`, the trainer in `pipeline.reward.trainer`, DPO in
`pipeline.reward.dpo`. This module
keeps the tokenizer and base model, the training of one RM (`train_one`), the stage's order of work (`run`)
and what the orchestrator asks before it runs (`inputs`, `check`, `estimate`, `space_needed`, `mismatch`: what the
saved RMs were really trained with, read back by `pipeline.reward.recorded`).

May import: pipeline leaves, `pipeline.policy.stage` (through `pipeline.reward.dpo`) and `pipeline.reward.*`.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from pipeline.data.render import check_template_setting, check_tokenizer_templates
from pipeline.io import atomic_write_json, file_records, inside, remove_tree, weights_bytes
from pipeline.logs import attach_progress, clock, human_bytes, say
from pipeline.models import (
    check_saved_templates,
    load_tokenizer,
    quantization_config,
    section_model_inputs,
    tiny_model,
    tiny_tokenizer,
)
from pipeline.reward.config import RewardStageConfig, rm_names, tiny_chat_template
from pipeline.reward.dpo import IMPLICIT, plan_dpo, train_dpo
from pipeline.reward.dpo import KIND as DPO_KIND
from pipeline.reward.fingerprint import (
    FINGERPRINT,
    RMPlan,
    base_is_current,
    checkpoint_dir,
    plan_rm,
    stale_reason,
    tiny_base_fingerprint,
)
from pipeline.reward.index import rm_dir
from pipeline.reward.trainer import MORERewardConfig


def check_batch_fits(recipe, splits) -> None:
    """Every batch takes `data.per_source_batch` pairs of every source (balanced methods) and each epoch as many
    batches as the smallest source fills, so a per-source batch larger than the smallest source's training pairs
    would resample every source up to it (a 10^6 batch of 38-pair sources grew memory for minutes): one
    RecipeError naming both numbers, before anything is mixed or trained (also under --dry-run).
    `data.n_train_per_source`, when set, is every source's training pairs (checked when the recipe is loaded)."""
    from pipeline.errors import RecipeError

    psb = recipe.data.per_source_batch
    if recipe.data.n_train_per_source is not None or not splits:
        return
    sizes = {s: len(dd["train"]) for s, dd in splits.items()}
    smallest = min(sizes, key=sizes.get)
    if psb > sizes[smallest]:
        raise RecipeError(
            f"data.per_source_batch = {psb} is larger than the smallest source's training pairs ({smallest!r}: "
            f"{sizes[smallest]} pairs): every batch takes per_source_batch pairs of every source. Fix: set "
            f"data.per_source_batch <= {sizes[smallest]}, or data.n_train_per_source to resample every source to "
            "that many pairs"
        )


def planned_steps(recipe, splits=None, world: int = 1) -> dict[str, int]:
    """Optimizer steps each RM of the recipe trains for, as the Trainer computes them: `max_steps` when > 0,
    else ceil(num_train_epochs x ceil(batches / gradient_accumulation_steps)). Batches per epoch: with
    `length_grouping` (the default) the sampler's full batches only (`LengthGroupedBalancedSampler`: the
    smallest source's pairs // per_source_batch for more/uniform, pairs // batch size for multitask), else
    ceil(pairs / batch size); divided over `world` processes (ceil). `splits` defaults to loading the data."""
    import math
    from collections import Counter

    from pipeline.data import build_splits, mix

    splits = build_splits(recipe.data) if splits is None else splits
    check_batch_fits(recipe, splits)
    train = recipe.reward.train
    defaults = {f.name: f.default for f in fields(MORERewardConfig) if f.name in ("max_steps", "num_train_epochs")}
    max_steps = int(train.get("max_steps", defaults["max_steps"]))
    epochs = float(train.get("num_train_epochs", defaults["num_train_epochs"]))
    accum = int(train.get("gradient_accumulation_steps", 1))
    grouping = bool(train.get("length_grouping", True))
    out = {}
    for name, method, srcs in rm_names(recipe.reward, list(splits)):
        if method == "dpo":
            out[name] = _dpo_steps(recipe, splits, srcs, world)
            continue
        if max_steps > 0:
            out[name] = max_steps
            continue
        balanced = method in ("more", "uniform")
        mixed = mix(
            {s: splits[s]["train"] for s in srcs},
            "balanced" if balanced else "concat",
            n_per_source=recipe.data.n_train_per_source,
            per_source_batch=recipe.data.per_source_batch,
            seed=recipe.seed,
        )
        psb, batch = recipe.data.per_source_batch, recipe.data.per_source_batch * len(srcs)
        if grouping and balanced:
            batches = min(Counter(mixed["source"]).values()) // psb
        elif grouping:
            batches = len(mixed) // batch
        else:
            batches = math.ceil(len(mixed) / batch)
        batches = math.ceil(batches / world)
        out[name] = math.ceil(epochs * max(math.ceil(batches / accum), 1))
    return out


def _dpo_steps(recipe, splits, sources: list[str], world: int) -> int:
    """The dpo method's optimizer steps as the Trainer counts them (every pair; TRL may drop a pair whose prompt
    alone fills reward.dpo.max_length)."""
    import math

    from pipeline.reward.dpo import dpo_train_rows

    cfg = recipe.reward.dpo
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(len(dpo_train_rows(recipe, splits, sources)) / (cfg.batch_size * world))
    return math.ceil(cfg.num_train_epochs * max(math.ceil(batches / cfg.gradient_accumulation_steps), 1))


def measured_step_seconds(run_dir: Path) -> float | None:
    """Seconds per optimizer step of the RMs last trained in `run_dir` (their train_log.json's train_runtime /
    step, pooled), or None when none was trained there."""
    runtime = steps = 0.0
    for log_file in sorted((Path(run_dir) / "reward").glob("*/train_log.json")):
        try:
            last = json.loads(log_file.read_text())[-1]
            runtime, steps = runtime + float(last["train_runtime"]), steps + float(last["step"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
    return runtime / steps if steps else None


def _synthetic_texts(recipe, splits) -> list[str]:
    """Texts to train the tiny tokenizer on: the synthetic corpus, else the training pairs."""
    formats = {s.format for s in recipe.data.sources}
    if formats == {"synthetic"}:
        from pipeline.data.synthetic import synthetic_corpus

        return synthetic_corpus(recipe.data.synthetic)
    texts = []
    for dd in splits.values():
        tr = dd["train"]
        texts += [p + c for p, c in zip(tr["prompt"], tr["chosen"])] + list(tr["rejected"])
    return texts


def build_tokenizer(recipe, splits, run_dir: Path):
    """The tokenizer every RM of this run shares (trained once for tiny models, saved in DIR/reward/)."""
    from pipeline.data.render import set_chat_template

    cfg = recipe.reward
    if cfg.model_name_or_path:
        from pipeline.models import check_model_source

        check_model_source(cfg.model_name_or_path, key="reward.model_name_or_path")  # one line, not a traceback
        tok = load_tokenizer(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, key="reward.model_name_or_path"
        )
        if cfg.chat_template is None:  # the tokenizer's own template is used: checked like a recipe's
            source = f"reward.model_name_or_path ({cfg.model_name_or_path})"
            check_tokenizer_templates(tok.chat_template, source, "reward.chat_template")
        return set_chat_template(tok, cfg.chat_template, where="reward.chat_template")
    texts = _synthetic_texts(recipe, splits)
    tok_dir = run_dir / "reward" / ".base"
    if base_is_current(tok_dir, tiny_base_fingerprint(recipe, texts), "tokenizer.json"):
        return load_tokenizer(str(tok_dir))
    return tiny_tokenizer(texts, vocab_size=cfg.tokenizer_vocab_size, chat_template=tiny_chat_template(recipe.reward))


def base_model_path(recipe, tokenizer, run_dir: Path, splits=None) -> str:
    """A path to load the base model from; the tiny random model is saved once to DIR/reward/.base (and
    rebuilt when what it is built from changes)."""
    cfg = recipe.reward
    if cfg.model_name_or_path:
        return _resolve_model_path(cfg.model_name_or_path)
    from accelerate import PartialState

    base = run_dir / "reward" / ".base"
    fp = tiny_base_fingerprint(recipe, _synthetic_texts(recipe, splits)) if splits is not None else None
    state = PartialState()
    stale = not (base / "config.json").exists() or (fp is not None and not base_is_current(base, fp, "config.json"))
    if state.is_main_process and stale:
        if (base / "config.json").exists():
            say("reward", "the tiny base model's settings or training texts changed: rebuilding reward/.base")
        tmp = base.with_name(".base.partial")
        remove_tree(tmp, run_dir)
        tiny_model(cfg.tiny, tokenizer, task="reward", seed=recipe.seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fp is not None:
            atomic_write_json(tmp / FINGERPRINT, {"fingerprint": fp})
        remove_tree(base, run_dir)
        os.replace(tmp, base)
    state.wait_for_everyone()
    return str(base)


def _resolve_model_path(path: str) -> str:
    """`pkg:<module>` names a model shipped inside an installed Python package (recipes resolve it when
    loaded; this covers configs built in code)."""
    if not path.startswith("pkg:"):
        return path
    from pipeline.io import resolve_pkg_path

    return resolve_pkg_path(path, "reward.model_name_or_path")


def load_base_model(cfg: RewardStageConfig, path: str, seed: int | None = None):
    """The base model with a reward head (and the LoRA config when `cfg.peft` asks). With `seed`, the RNG is
    seeded first, so a newly initialised head gets the same weights whatever this process ran before (the
    Trainer seeds only after the model exists: without this, the second RM of a run started from another
    head than the same RM trained alone)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    if seed is not None:
        set_seed(seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    bits = {"qlora4": 4, "qlora8": 8}.get(cfg.peft)
    kwargs = dict(num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if bits:  # QLoRA: TRL keeps adapters (and the saved head) in bf16, so the unquantized rest is bf16 too
        kwargs["dtype"] = torch.bfloat16
        kwargs["quantization_config"] = quantization_config(bits, compute_dtype=torch.bfloat16)
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    peft_config = None
    if cfg.peft != "none":
        from peft import LoraConfig

        from pipeline.layout import find_reward_head

        head = next(n for n, m in model.named_modules() if m is find_reward_head(model))
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            modules_to_save=[head.split(".")[-1]],
        )
    return model, peft_config


def _resume_point(ckpt_dir: Path, plan: RMPlan, run_dir: Path) -> str | None:
    """The checkpoint to resume from (main process decides; deletes stale and incomplete ones)."""
    from pipeline.checkpoints import checkpoint_problem, list_checkpoints

    if not ckpt_dir.is_dir():
        return None
    try:
        recorded = json.loads((ckpt_dir / FINGERPRINT).read_text()).get("fingerprint")
    except (OSError, ValueError):
        recorded = None
    if recorded != plan.fingerprint:
        if list_checkpoints(ckpt_dir):
            say("reward", f"{plan.name}: discarding checkpoints in {ckpt_dir}: they were made from other inputs")
        remove_tree(ckpt_dir, run_dir)
        return None
    for ckpt in list_checkpoints(ckpt_dir):
        problem = checkpoint_problem(ckpt, plan.method)
        if problem is None:
            return str(ckpt)
        say("reward", f"{plan.name}: skipping incomplete checkpoint {ckpt.name} ({problem}); deleting it")
        remove_tree(ckpt, run_dir)
    return None


def train_one(recipe, run_dir: Path, plan: RMPlan, tokenizer, base: str, fresh: bool = False, label: str = ""):
    """Train (or resume) one RM and save it atomically to DIR/reward/<name>/ with its fingerprint (`label`,
    e.g. 'more, RM 2 of 3', names its progress lines)."""
    from accelerate import PartialState

    from pipeline.reward.trainer import MORERewardTrainer

    cfg, name = recipe.reward, plan.name
    out = inside(run_dir, rm_dir(run_dir, name))
    ckpt_dir = inside(run_dir, checkpoint_dir(run_dir, name))
    if cfg.train.get("deepspeed") and not torch.cuda.is_available():
        # DeepSpeed on CPU: its comm layer must wrap the gloo group before the Trainer builds its config
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    state = PartialState()
    last = None
    if state.is_main_process:
        if fresh:
            remove_tree(ckpt_dir, run_dir)
        last = _resume_point(ckpt_dir, plan, run_dir)
        if last:
            say("reward", f"{name}: resuming from {last} (its last complete checkpoint)")
        elif ckpt_dir.is_dir() and not fresh:
            say("reward", f"{name}: no complete checkpoint to resume from; training from the start")
        atomic_write_json(ckpt_dir / FINGERPRINT, {"fingerprint": plan.fingerprint, "inputs": plan.inputs})
    if state.num_processes > 1:
        import torch.distributed as dist

        box = [last]
        dist.broadcast_object_list(box, src=0)
        last = box[0]
    args = MORERewardConfig(**plan.args)
    model, peft_config = load_base_model(cfg, base, seed=args.seed)
    trainer = MORERewardTrainer(
        model, args, train_dataset=plan.train, processing_class=tokenizer, peft_config=peft_config
    )
    attach_progress(trainer, f"reward {label or name}")
    trainer.train(resume_from_checkpoint=last)

    partial = inside(run_dir, out.with_name(f".{out.name}.partial"))
    if state.is_main_process:
        remove_tree(partial, run_dir)
    state.wait_for_everyone()
    trainer.save_with_card(partial, base_model=cfg.model_name_or_path)  # every rank (ZeRO-3 gathers)
    if state.is_main_process:
        tokenizer.save_pretrained(partial)
        _write_train_prompts(partial, plan.train)
        atomic_write_json(partial / "train_log.json", trainer.state.log_history)
        atomic_write_json(
            partial / "reward_info.json",
            {
                "name": name,
                "method": plan.method,
                "sources": plan.sources,
                "n_train_pairs": len(plan.train),
                "n_truncated_sequences": trainer.n_truncated.get("train", 0),
                "n_dropped_pairs": trainer.n_dropped.get("train", 0),
                "max_length": plan.args.get("max_length"),
                "truncation": plan.args.get("truncation"),
            },
        )
        files = file_records(partial, ["."])
        atomic_write_json(
            partial / FINGERPRINT,
            {
                "fingerprint": plan.fingerprint,
                "inputs": plan.inputs,
                "files": {str(Path(f)): r for f, r in files.items()},
            },
        )
        remove_tree(out, run_dir)
        os.replace(partial, out)
        remove_tree(ckpt_dir, run_dir)
    state.wait_for_everyone()
    del trainer, model


def _write_train_prompts(rm_dir: Path, train) -> None:
    """<rm dir>/train_prompts.json: the hashes of the prompts the RM was trained on, so calibration can count
    (and exclude) evaluation pairs it has seen, in this run or when another run evaluates it as external."""
    from pipeline.data.mixing import TRAIN_PROMPTS, train_prompts_record

    atomic_write_json(Path(rm_dir) / TRAIN_PROMPTS, train_prompts_record(train["prompt"]))


def _plan(recipe, run_dir: Path, name: str, method: str, srcs: list[str], splits, tokenizer, base):
    """(the RM's plan, a function training it): a classic RM (`train_one`), or the dpo method's policy
    (`pipeline.reward.dpo`, from the policy stage's base policy)."""
    if method == "dpo":
        plan, policy, policy_tok = plan_dpo(recipe, run_dir, name, srcs, splits)
        return plan, lambda fresh, label: train_dpo(recipe, run_dir, plan, policy, policy_tok, label=label)
    plan = plan_rm(recipe, run_dir, name, method, srcs, splits, tokenizer, base)
    return plan, lambda fresh, label: train_one(recipe, run_dir, plan, tokenizer, base, fresh=fresh, label=label)


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Train every RM the recipe asks for; reuse those saved from the same inputs (all retrained when
    `force`). Returns artifact paths relative to run_dir."""
    from accelerate import PartialState

    from pipeline.data import build_splits
    from pipeline.data.mixing import TRAIN_PROMPTS, data_stats, describe_data_stats

    run_dir = Path(run_dir)
    splits = build_splits(recipe.data)
    check_batch_fits(recipe, splits)
    sources = list(splits)
    stats = data_stats(splits)
    if PartialState().is_main_process:
        for line in describe_data_stats(stats):
            say("reward", f"data {line}")
    tokenizer = build_tokenizer(recipe, splits, run_dir)
    base = base_model_path(recipe, tokenizer, run_dir, splits)
    index = {}
    rms = rm_names(recipe.reward, sources)
    for i, (name, method, srcs) in enumerate(rms, 1):
        out = inside(run_dir, rm_dir(run_dir, name))
        plan, train = _plan(recipe, run_dir, name, method, srcs, splits, tokenizer, base)
        reason = "forced (--force reward)" if force else stale_reason(out, plan)
        of = f"RM {i} of {len(rms)}"
        if reason is None:
            say(
                "reward", f"{of}: {name}: already trained, skipping (same inputs: fingerprint {plan.fingerprint[:10]})"
            )
            if PartialState().is_main_process and not (out / TRAIN_PROMPTS).is_file():  # trained before the record
                _write_train_prompts(out, plan.train)
        else:
            say("reward", f"{of}: training {name} (method={method}, sources={srcs}): {reason}")
            train(fresh=force, label=f"{name}, {of}")
        index[name] = {  # the key is the RM's name as given; the path its directory (safe_component)
            "path": f"reward/{out.name}",
            "method": "single" if name.startswith("single-") else method,
            "sources": srcs,
            "train_prompts": f"reward/{out.name}/{TRAIN_PROMPTS}",
        }
        if method == "dpo":  # a policy: calibration and align read it as an implicit RM (its implicit.json)
            index[name].update(kind=DPO_KIND, implicit=f"reward/{out.name}/{IMPLICIT}")
    if PartialState().is_main_process:
        truncated = {}
        for name in index:
            try:
                truncated[name] = json.loads((rm_dir(run_dir, name) / "reward_info.json").read_text())[
                    "n_truncated_sequences"
                ]
            except (OSError, ValueError, KeyError):
                truncated[name] = None
        atomic_write_json(
            run_dir / "reward" / "data_stats.json",
            {
                "sources": stats,
                "over_length_pairs": {
                    "note": f"training pairs longer than data.max_length={recipe.data.max_length} tokens: "
                    + (
                        "kept, cut from the left (reward.train.truncation=left, the pipeline's default)"
                        if recipe.reward.training_args({})["truncation"] == "left"
                        else "dropped, as TRL does (reward.train.truncation=drop)"
                    ),
                    "per_rm": truncated,
                },
            },
        )
        atomic_write_json(run_dir / "reward" / "index.json", index)
        # pairs per source and split, for the report's "What ran" (the data the RMs actually saw)
        atomic_write_json(
            run_dir / "reward" / "data.json", {s: {k: len(v) for k, v in dd.items()} for s, dd in splits.items()}
        )
    PartialState().wait_for_everyone()
    return ["reward/index.json", "reward/data_stats.json", "reward/data.json"] + [
        f"reward/{v['path'].split('/')[-1]}" for v in index.values()
    ]


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the reward section names besides the data sources: the base model and a chat-template file."""
    return section_model_inputs(section)


def mismatch(recipe, run_dir: Path) -> list[dict]:
    """The recipe keys whose value differs from what the RMs saved in run_dir record in their fingerprint.json
    (`pipeline.reward.recorded.recipe_mismatch`): a later stage that would use them is refused on this recipe."""
    from pipeline.reward.recorded import recipe_mismatch

    return recipe_mismatch(recipe, run_dir)


def check(recipe, *, runs: bool, origin) -> None:
    """Before any work (also under --dry-run): dpo with an align.prompt_style other than raw, a
    reward.chat_template that does not parse or raises, and, when
    the stage runs, a local reward.model_name_or_path without tokenizer files or (with reward.chat_template null)
    whose own chat template does not parse, raises or runs past the check's time limit; a MORE RM on two sources
    under l2 normalisation (the Uniform baseline in disguise) is warned about."""
    from pipeline.errors import RecipeError
    from pipeline.models import ModelLoadError, check_model_source, check_tokenizer_files

    check_template_setting(recipe.reward.chat_template, "reward.chat_template", origin)
    if "dpo" in recipe.reward.methods and recipe.align.prompt_style != "raw":
        raise RecipeError(
            f"reward.methods in {origin('reward.methods')} trains dpo on prompts in the raw layout the policy is "
            f"aligned with under align.prompt_style=raw, but align.prompt_style={recipe.align.prompt_style!r} "
            f"(in {origin('align.prompt_style')}). Fix: align.prompt_style=raw, or drop dpo from reward.methods"
        )
    if runs and recipe.reward.model_name_or_path:
        try:
            check_model_source(recipe.reward.model_name_or_path, key="reward.model_name_or_path")  # said first
            check_tokenizer_files(recipe.reward.model_name_or_path, key="reward.model_name_or_path")
        except ModelLoadError as e:
            raise RecipeError(f"{e} (in {origin('reward.model_name_or_path')})") from None
        check_saved_templates(recipe.reward, "reward", origin)
    if note := two_source_more_warning(recipe):
        say("reward", f"warning: {note}")


def two_source_more_warning(recipe) -> str | None:
    """The warning for a MORE RM the recipe trains on exactly two sources with reward.train.normalize=l2 (the
    default), when the recipe alone tells the number of sources (a `group_by` source's groups are known only
    once the data is read: the trainer warns then)."""
    from pipeline.reward.more import two_source_note

    sources = recipe.data.sources
    if "more" not in recipe.reward.methods or any((s.options or {}).get("group_by") for s in sources):
        return None
    normalize = (recipe.reward.train or {}).get("normalize", MORERewardConfig.normalize)
    return two_source_note(len(sources), normalize, key="reward.train.normalize")


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, str]:
    """The --dry-run line: every RM's optimizer steps, and a training time only where this directory measured
    a step time before."""
    counts = planned_steps(recipe, world=world)
    total = sum(counts.values())
    work = (
        f"{len(counts)} RMs, {total} optimizer steps ("
        + ", ".join(f"RM {i} of {len(counts)} {rm}: {n}" for i, (rm, n) in enumerate(counts.items(), 1))
        + ")"
    )
    sec = measured_step_seconds(run_dir)
    if not sec:
        return work, "training time unknown (no step time measured in this directory yet)"
    return work, f"training about {clock(sec * total)} at the {sec:.3g} s/step measured in this directory"


def space_needed(recipe, run_dir: Path) -> tuple[int, str] | None:
    """Free space the stage needs, per RM: a checkpoint (weights plus AdamW's two moments: 3x the weights)
    and the RM itself (1x); None when the base model's weights are not on disk yet."""
    base = recipe.reward.model_name_or_path
    local = Path(base) if base and Path(base).is_dir() else Path(run_dir) / "reward" / ".base"
    weights = weights_bytes(local)
    if not weights:
        return None
    return 4 * weights, f"a checkpoint and a saved RM: 4x the {human_bytes(weights)} of base model weights"
