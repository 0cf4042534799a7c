"""The alignment methods (`align.methods`) in one literal table, `METHODS` (name -> function): best-of-n,
rejection-sampling fine-tuning, PPO, RLOO; and `align_one`, which makes DIR/align/<rm>/<method>/ with one.

A method is a function `method(inputs, reward, work) -> Outputs | None` of what every alignment of the run
starts from (`AlignInputs`: the stage's context, the base policy and its tokenizer, the candidates, the
perplexity data, the gold reward), the RM's reward `reward(prompts, responses) -> np.ndarray` (an
`RMReward`, cross-tokenizer), and the work directory of this RM and method. Every process calls it (rjs,
rloo and ppo train data-parallel); it writes what it produced into `work` and returns, on the main process,
the policy's held-out responses and perplexities (None on the other processes):

* `best_of_n`: nothing is trained. For each prompt the RM picks the best of the n candidates; the
  records (prompt, candidates, scores, chosen index) are the result (`samples.jsonl`); on the held-out
  prompts the RM picks among the base policy's candidates (the policy is the base policy: no perplexity).
* `rjs` (rejection sampling, the paper's RJS): supervised fine-tuning on each prompt's best candidate
  (`pipeline.align.trainers.run_rjs`).
* `ppo`: this project's PPO (`pipeline.align.trainers.run_ppo`).
* `rloo`: TRL's RLOO (`pipeline.align.trainers.run_rloo`); the gold reward, when there is one, is logged.
* `policy`: an implicit RM's own policy (the reward stage's DPO policy, trained from the same base policy)
  answers the held-out prompts: nothing is trained and no reward is used, so the DPO policy is judged beside
  the RM-aligned ones (DIR/align/dpo/policy/). A classic RM has no policy of its own: skipped for it.

The reward of an implicit RM (best-of-n, RJS, PPO, RLOO with `dpo`) is its implicit reward beta * log(pi / pi_ref)
(`pipeline.align.rewards.ImplicitReward`).

The processes meet at four barriers per (RM, method), in this order: (1) the work directory is ready
(cleared of other settings' partial work) before any process writes into it; (2) best-of-n's samples.jsonl
is written by the main process before every process reads it; (3) every process has finished (training
saved the policy, samples.jsonl was read) before the main process evaluates and moves the work files into
the published directory; (4) that directory is published before the next alignment or the judging reads it.

May import: pipeline leaves and `pipeline.align.{context, candidates, prompts, trainers, ppo}`.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.align.candidates import eval_records, perplexities, read_jsonl, rm_reward, with_conv, write_jsonl
from pipeline.align.context import AlignContext, rerun_reason, why
from pipeline.align.prompts import sft_completion, turn_stops
from pipeline.align.trainers import rjs_dataset, run_ppo, run_rjs, run_rloo, sft_config
from pipeline.io import atomic_dir, atomic_write_json, inside, read_json, remove_tree, safe_component


@dataclass(frozen=True)
class AlignInputs:
    """What every (RM, method) alignment of a run starts from (the stage builds it once)."""

    ctx: AlignContext
    base_path: str  # the base policy
    tok: Any  # its tokenizer
    train_cands: list[dict]  # the base policy's candidates for the training prompts
    eval_cands: list[dict]  # ... and for the held-out prompts
    ppl_data: dict  # {source: (test prompts, chosen answers)}
    gold_fn: Callable | None = None  # a reward that RL logs (never optimizes); None without one

    @property
    def prompts(self) -> list[str]:
        """The training prompts as the policy sees them."""
        return [r["policy_prompt"] for r in self.train_cands]

    @property
    def raw_prompts(self) -> list[str]:
        """The training prompts as in the data (what the RMs score)."""
        return [r["prompt"] for r in self.train_cands]

    @property
    def stop_ids(self) -> tuple:
        """A chat-templated policy's end-of-turn token, which ends RL rollouts too; () without."""
        if not any(r.get("templated") for r in self.train_cands):
            return ()
        return turn_stops(self.tok).get("stop_token_ids", ())


class Outputs(NamedTuple):
    """What a method returns on the main process: its held-out responses and the policy's perplexities."""

    evals: list[dict]
    perplexity: dict | None  # None: the policy is the base policy (best-of-n)


# ---------------------------------------------------------------------------------------------------
# best-of-n records


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


def nested_picks(candidates: Sequence[str], scores, sizes: Sequence[int]) -> dict:
    """{"responses_at": {N: the best of the first N candidates}} for best-of-N at each N of `sizes` (nested subsets
    of one draw; first on ties, as `best_of_n_records`); {} without sizes."""
    if not sizes:
        return {}
    row = np.asarray(scores, dtype=np.float64)
    picks = {}
    for k in sorted({int(s) for s in sizes}):
        head = row[:k]
        picks[str(k)] = candidates[int(np.nanargmax(head)) if not np.all(np.isnan(head)) else 0]
    return {"responses_at": picks}


def score_candidates(reward_fn, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
    """RM scores of every candidate, shape (prompts, n), with one batched call."""
    n = len(candidates[0]) if candidates else 0
    flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
    flat_r = [c for cs in candidates for c in cs]
    return np.asarray(reward_fn(flat_p, flat_r), dtype=np.float64).reshape(len(prompts), n)


# ---------------------------------------------------------------------------------------------------
# the methods


def _best_of_n_samples(a: AlignInputs, reward, work: Path, first: int | None = None) -> list[dict]:
    """The RM's pick among each training prompt's candidates (the first `first` of them; None: all):
    work/samples.jsonl (written once, by the main process), read by every process."""
    if a.ctx.main and not (work / "samples.jsonl").exists():
        cands = [r["candidates"][:first] for r in a.train_cands]
        scores = score_candidates(reward, a.raw_prompts, cands)
        records = best_of_n_records(a.raw_prompts, cands, scores, [r["ended"][:first] for r in a.train_cands])
        for rec, r in zip(records, a.train_cands):
            rec["set"] = r["set"]
        write_jsonl(work / "samples.jsonl", records)
    a.ctx.barrier()  # (2) samples.jsonl is complete before any process reads it
    return read_jsonl(work / "samples.jsonl")


def _trained(a: AlignInputs, work: Path) -> Outputs | None:
    """The outputs of a trained policy (work/policy): its held-out responses and perplexities (main process)."""
    a.ctx.barrier()  # (3) every process has finished training and the policy is saved before it is loaded
    if not a.ctx.main:
        return None
    policy = str(work / "policy")
    return Outputs(eval_records(a.ctx, policy, a.tok, a.eval_cands), perplexities(a.ctx, policy, a.tok, a.ppl_data))


def best_of_n(a: AlignInputs, reward, work: Path) -> Outputs | None:
    """Best-of-n: the RM picks among the base policy's candidates, on the training prompts (samples.jsonl)
    and on the held-out ones (its responses); nothing is trained."""
    _best_of_n_samples(a, reward, work)
    a.ctx.barrier()  # (3) every process has read samples.jsonl before the main process moves it
    if not a.ctx.main:
        return None
    scores = score_candidates(reward, [r["prompt"] for r in a.eval_cands], [r["candidates"] for r in a.eval_cands])
    evals = []
    for r, row in zip(a.eval_cands, scores):
        k = int(np.nanargmax(row))
        evals.append(
            with_conv(
                {
                    "prompt": r["prompt"],
                    "set": r["set"],
                    "response": r["candidates"][k],
                    "ended": r["ended"][k],
                    "scores": [float(x) for x in row],
                    "chosen": k,
                    **nested_picks(r["candidates"], row, a.ctx.cfg.best_of_n_sizes),
                },
                r,
            )
        )
    return Outputs(evals, None)  # the policy is the base policy


def rjs(a: AlignInputs, reward, work: Path) -> Outputs | None:
    """Rejection sampling fine-tuning: SFT of the base policy on each training prompt's best candidate."""
    cfg = a.ctx.cfg
    records = _best_of_n_samples(a, reward, work, first=cfg.rjs_n)
    if not (work / "train_log.json").exists():  # written last, once the policy is saved
        best = [sft_completion(a.tok, r, rec["candidates"][rec["chosen"]]) for r, rec in zip(a.train_cands, records)]
        dataset = rjs_dataset(a.tok, a.prompts, best, cfg.sft_max_length)
        args = sft_config(
            work / ".trainer",
            batch_size=cfg.sft_batch_size,
            micro_batch_size=cfg.sft_micro_batch_size,
            learning_rate=cfg.sft_learning_rate,
            lr_scheduler=cfg.sft_lr_scheduler,
            warmup_ratio=cfg.sft_warmup_ratio,
            epochs=cfg.sft_epochs,
            max_length=cfg.sft_max_length,
            seed=a.ctx.seed,
            save_steps=cfg.sft_save_steps,
        )
        run_rjs(
            a.base_path,
            a.tok,
            dataset,
            args,
            work,
            peft=cfg.peft,
            lora=_lora(cfg),
            trust_remote_code=cfg.trust_remote_code,
        )
    return _trained(a, work)


def ppo(a: AlignInputs, reward, work: Path) -> Outputs | None:
    """PPO on the training prompts with the RM as reward (resumes from its own checkpoints in `work`). Prompts a
    chat template rendered are encoded without special tokens, as for the candidates. The reward's scale is
    recorded in `reward_scale.json` (`reward_scale`): a calibrated reward is divided by the RM's temperature,
    which scales the KL coefficient's weight against the RM's raw reward."""
    cfg = a.ctx.cfg
    if a.ctx.main:
        atomic_write_json(work / "reward_scale.json", reward_scale(reward, {**_ppo_defaults(a), **(cfg.ppo or {})}))
    run_ppo(
        a.base_path,
        a.tok,
        a.prompts,
        a.raw_prompts,
        reward,
        work,
        overrides=cfg.ppo,
        defaults=_ppo_defaults(a),
        gold_fn=a.gold_fn,
        trust_remote_code=cfg.trust_remote_code,
        add_special_tokens=[not r.get("templated") for r in a.train_cands],
    )
    return _trained(a, work)


def _ppo_defaults(a: AlignInputs) -> dict:
    """PPOConfig values that come from the align section (align.ppo overrides them)."""
    cfg = a.ctx.cfg
    defaults = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_prompt_length=cfg.max_prompt_length,
        seed=a.ctx.seed,
        progress=cfg.progress,
        use_peft=cfg.peft == "lora",
    )
    if a.stop_ids:
        defaults["stop_token_ids"] = list(a.stop_ids)
    return defaults


def reward_scale(reward, ppo: dict) -> dict:
    """The scale of the reward PPO optimises: the RM's calibration temperature T (1.0 for a raw reward), the KL
    coefficient, and what that coefficient weighs against the RM's raw reward (kl_coef x T: PPO maximises
    r/T - kl_coef KL = (r - kl_coef T KL) / T), so PPO runs with RMs of different T trade reward against KL
    differently."""
    from pipeline.align.ppo import PPOConfig

    t = float(getattr(reward, "temperature", 1.0) or 1.0)
    kl = float(ppo.get("kl_coef", PPOConfig.kl_coef))
    return {"rm": getattr(reward, "name", None), "temperature": t, "kl_coef": kl, "kl_coef_vs_raw_reward": kl * t}


def rloo(a: AlignInputs, reward, work: Path) -> Outputs | None:
    """RLOO (TRL) on the training prompts with the RM as reward."""
    cfg = a.ctx.cfg
    if not (work / "train_log.json").exists():  # written last, once the policy is saved
        run_rloo(
            a.base_path,
            a.tok,
            a.prompts,
            a.raw_prompts,
            reward,
            work,
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=a.ctx.seed,
            overrides=cfg.rloo,
            gold_fn=a.gold_fn,
            peft=cfg.peft,
            lora=_lora(cfg),
            trust_remote_code=cfg.trust_remote_code,
            stop_token_ids=a.stop_ids,
        )
    return _trained(a, work)


def own_policy(a: AlignInputs, reward, work: Path) -> Outputs | None:
    """The implicit RM's own policy (a DPO policy) answers the held-out prompts; nothing is trained."""
    a.ctx.barrier()  # (3) every process is here before the main process samples and publishes
    if not a.ctx.main:
        return None
    path = reward.policy_path
    return Outputs(eval_records(a.ctx, path, a.tok, a.eval_cands), perplexities(a.ctx, path, a.tok, a.ppl_data))


def has_own_policy(rm_dir: Path) -> bool:
    """An implicit RM (its directory holds implicit.json): a policy the `policy` method samples from."""
    return (Path(rm_dir) / "implicit.json").is_file()


def _lora(cfg) -> dict:
    return dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


Method = Callable[[AlignInputs, Any, Path], Outputs | None]

# The methods `align.methods` may name, in the order the recipe help lists them.
METHODS: dict[str, Method] = {"best_of_n": best_of_n, "rjs": rjs, "ppo": ppo, "rloo": rloo, "policy": own_policy}


# ---------------------------------------------------------------------------------------------------
# one RM and one method: DIR/align/<rm>/<method>/


def align_one(a: AlignInputs, rm: str, rm_dir: Path, method: str, settings: str) -> None:
    """Produce DIR/align/<rm>/<method>/ (atomically) with `METHODS[method]` unless it exists with the same
    settings; partial work of the same settings in DIR/align/.work/<rm>/<method>/ is resumed."""
    ctx = a.ctx
    final = inside(ctx.run_dir, ctx.dir / safe_component(rm) / method)
    if method == "policy" and not has_own_policy(rm_dir):
        ctx.log(f"{rm}/{method}: a classic RM has no policy of its own (only an implicit RM, dpo, has): skipped")
        return
    reason = rerun_reason(final / "settings.json", settings)
    if reason is None:
        ctx.log(f"{rm}/{method}: done earlier, skipping")
        return
    ctx.log(f"{rm}/{method}: aligning{why(reason)}")
    work = inside(ctx.run_dir, ctx.dir / ".work" / safe_component(rm) / method)
    if ctx.main:
        _prepare_work(ctx, work, settings)
    ctx.barrier()  # (1) the work directory is ready before any process writes into it
    reward = rm_reward(ctx, rm_dir)
    outputs = METHODS[method](a, reward, work)
    if ctx.main:
        _publish(ctx, work, final, outputs, settings)
    del reward
    gc.collect()
    ctx.barrier()  # (4) DIR/align/<rm>/<method> is published before the next alignment or the judging


def _prepare_work(ctx: AlignContext, work: Path, settings: str) -> None:
    """The work directory of these settings: kept (to resume) when it was made with them, else emptied."""
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "settings.json"
    if stamp.exists() and read_json(stamp) != settings:
        remove_tree(work, ctx.run_dir)  # stale partial work from other settings
        work.mkdir(parents=True)
    atomic_write_json(stamp, settings)


def _publish(ctx: AlignContext, work: Path, final: Path, outputs: Outputs, settings: str) -> None:
    """Move what the method wrote (but its trainer state) and its outputs into `final`, atomically."""
    with atomic_dir(final) as tmp:
        for item in work.iterdir():
            if item.name in (".trainer", "checkpoint", ".adapter", "settings.json"):
                continue
            shutil.move(str(item), tmp / item.name)
        write_jsonl(tmp / "eval.jsonl", outputs.evals)
        if outputs.perplexity is not None:
            atomic_write_json(tmp / "perplexity.json", outputs.perplexity)
        atomic_write_json(tmp / "settings.json", settings)
    remove_tree(work, ctx.run_dir)
