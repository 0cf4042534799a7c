"""Alignment stage: align a policy with each trained RM by each method, then judge and compare them.

    python -m pipeline.align --recipe tiny-cpu --output-dir runs/tiny align.methods=[best_of_n,rjs]

What it does, in order (DIR = the run directory):

1. Base policy. `align.model_name_or_path` (a save_pretrained directory or hub id, e.g. Alpaca-7B), or,
   when null, a tiny random causal LM warm-started on the synthetic benchmark's responses of mixed
   quality (`pipeline.align.policy.warm_start_policy`), saved to DIR/align/base/policy.
2. Prompts from the run's data splits: training prompts from the TRAIN split of `prompt_sources`
   (the paper: Helpful & Harmless), held-out prompt sets from the TEST split of `eval_sources` (one
   prompt set per source), formatted for the policy by `prompt_style` (raw HH layout or Alpaca).
3. Candidates: n samples per training prompt and per held-out prompt from the base policy (batched,
   `pipeline.align.generate.sample`), sampled ONCE and shared by every RM, so RMs differ only in what
   they pick. DIR/align/base/{train,eval}_candidates.jsonl.
4. For each RM (default: every RM in DIR/reward/index.json except single-source ones) and each method
   in `methods`: DIR/align/<rm>/<method>/ with samples.jsonl (best_of_n, rjs), policy/ (HF format;
   rjs, rloo, ppo), train_log.json, eval.jsonl (its response to every held-out prompt),
   perplexity.json, settings.json. Each sub-directory is published atomically when finished and skipped
   on rerun while its settings (config, RM weights) are unchanged; training runs resume from
   DIR/align/.work/<rm>/<method>/.
5. Judging (`judge.kind`): gold (the synthetic benchmark's r*, or an RM directory as gold) or an
   OpenAI-compatible LLM judge (both orders, agreeing = win, see pipeline.align.judge), for each
   comparison (default: MORE vs MultiTask, each vs the base policy) and each method, per prompt set.
   DIR/align/judgements.json `{"<method>: <a> vs <b>": {prompt_set: {win, tie, lose, n, counts,
   interval}}}`, judge_details.jsonl, metrics.json (per policy: gold reward, perplexity of the test
   answers), table.md.

Under `accelerate launch` the main process samples, scores, judges and writes; every rank joins the
training of rjs / rloo / ppo (data-parallel).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.align.ppo import PPOConfig
from pipeline.data.render import check_template_setting
from pipeline.errors import RecipeError
from pipeline.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    content_sha256,
    inside,
    read_json,
    remove_tree,
    safe_component,
)
from pipeline.models import section_model_inputs


METHODS = ("best_of_n", "rjs", "ppo", "rloo")


@dataclass
class JudgeConfig:
    """How aligned policies are compared on held-out prompts."""

    kind: str = field(
        default="gold",
        metadata={
            "help": "gold (a reference reward decides) | openai (an LLM judge over an OpenAI-compatible endpoint) | none"
        },
    )
    gold: str = field(
        default="synthetic",
        metadata={
            "help": "For kind=gold: 'synthetic' (the synthetic benchmark's r*; needs synthetic data) or the path of a reward-model directory used as the gold judge."
        },
    )
    tolerance: float = field(
        default=0.0, metadata={"help": "For kind=gold: a tie when the gold rewards differ by at most this much."}
    )
    base_url: str = field(
        default="https://api.openai.com/v1",
        metadata={"help": "For kind=openai: base URL of the chat-completions API (…/v1)."},
    )
    model: str = field(default="gpt-4", metadata={"help": "For kind=openai: judge model name."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "NAME of the environment variable holding the API key ('' for none). The key itself is never written anywhere."
        },
    )
    concurrency: int = field(default=4, metadata={"help": "For kind=openai: parallel requests."})
    max_requests: int = field(
        default=2000,
        metadata={"help": "For kind=openai: request budget of one run (retries count); cached answers are free."},
    )
    retries: int = field(
        default=4, metadata={"help": "For kind=openai: retries of a failed request (exponential backoff)."}
    )
    backoff_s: float = field(
        default=1.0, metadata={"help": "For kind=openai: first retry delay in seconds (doubles each retry)."}
    )
    timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "For kind=openai: deadline of one whole request (connect, headers, body) in seconds; a request past it is retried."
        },
    )
    max_tokens: int = field(default=256, metadata={"help": "For kind=openai: longest judge reply."})
    max_invalid: int = field(
        default=8,
        metadata={
            "help": "For kind=openai: replies without an A/B verdict in a row that fail the stage (a judge model "
            "that does not follow the instruction); 0 = never fail, count them as invalid."
        },
    )

    def __post_init__(self):
        if self.kind not in ("gold", "openai", "none"):
            raise ValueError(f"judge.kind must be gold, openai or none, got {self.kind!r}")
        if self.tolerance < 0:
            raise ValueError(f"judge.tolerance must be >= 0, got {self.tolerance}")
        if self.concurrency < 1:
            raise ValueError(f"judge.concurrency must be >= 1 (parallel requests), got {self.concurrency}")
        if self.retries < 0 or self.max_requests < 0 or self.max_invalid < 0:
            raise ValueError(
                f"judge.retries, judge.max_requests and judge.max_invalid must be >= 0, got {self.retries}, "
                f"{self.max_requests} and {self.max_invalid}"
            )
        if not self.timeout_s > 0 or self.backoff_s < 0:
            raise ValueError(
                f"judge.timeout_s must be > 0 and judge.backoff_s >= 0, got {self.timeout_s} and {self.backoff_s}"
            )


@dataclass
class AlignConfig:
    """Alignment stage: best-of-n / rejection sampling / PPO / RLOO with each trained RM, judged."""

    methods: list[str] = field(
        default_factory=lambda: ["best_of_n", "rjs"],
        metadata={
            "help": "Methods to run: best_of_n, rjs, ppo (experimental), rloo (TRL's RLOOTrainer: the supported RL method)."
        },
    )
    rms: list[str] | None = field(
        default=None,
        metadata={"help": "RM names from DIR/reward/index.json; null = every RM except single-<source> ones."},
    )
    # --- policy
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base policy (save_pretrained dir or hub id, e.g. an Alpaca-7B checkpoint); null = a tiny policy warm-started on the synthetic benchmark."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})
    policy_arch: str = field(default="gpt_neox", metadata={"help": "Tiny policy: gpt_neox | llama."})
    policy_size: str = field(default="tiny", metadata={"help": "Tiny policy: tiny | mini | small."})
    policy_vocab_size: int = field(
        default=1000,
        metadata={
            "help": "Tiny policy: vocabulary of its locally trained tokenizer (differs from the RMs' on purpose)."
        },
    )
    warm_start_steps: int = field(default=300, metadata={"help": "Tiny policy: optimizer steps of the warm start."})
    warm_start_lr: float = field(default=3e-3, metadata={"help": "Tiny policy: warm-start learning rate."})
    warm_start_batch_size: int = field(default=32, metadata={"help": "Tiny policy: warm-start batch size."})
    warm_start_save_steps: int = field(
        default=50,
        metadata={
            "help": "Tiny policy: keep a resumable warm-start checkpoint every N steps (0: none; an interrupted "
            "warm start then restarts from step 0)."
        },
    )
    warm_start_prompts: int = field(
        default=400, metadata={"help": "Tiny policy: synthetic prompts of the warm start."}
    )
    warm_start_responses: int = field(
        default=4, metadata={"help": "Tiny policy: synthetic responses (mixed quality) per warm-start prompt."}
    )
    # --- prompts
    prompt_sources: list[str] = field(
        default_factory=lambda: ["helpful", "harmless"],
        metadata={"help": "Sources whose TRAIN prompts the policy is aligned on (the paper: Helpful & Harmless)."},
    )
    eval_sources: list[str] = field(
        default_factory=lambda: ["helpful", "harmless"],
        metadata={
            "help": "Sources whose TEST prompts are judged (one prompt set each) and whose test answers give the perplexities."
        },
    )
    n_prompts: int | None = field(
        default=1024, metadata={"help": "Training prompts (distinct, seeded sample); null = all."}
    )
    n_eval_prompts: int = field(default=200, metadata={"help": "Held-out prompts per prompt set."})
    n_ppl: int = field(
        default=500, metadata={"help": "Test answers (chosen responses) per source for the perplexity."}
    )
    prompt_style: str = field(
        default="raw",
        metadata={
            "help": "raw (the HH layout) | alpaca (Alpaca's instruction template). Applies to text prompts and to conversational ones when the policy has no chat template."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "The POLICY's chat template (pipeline.data.render): null keeps its tokenizer's own, a Jinja string, a .jinja path, or 'none' (plain layout / prompt_style). Conversational prompts are rendered with it (add_generation_prompt) and responses cut at its end-of-turn token."
        },
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts are truncated from the left to this many policy tokens."}
    )
    # --- sampling (the paper: n=4, T=1.2, top_p=1.0, 256 new tokens)
    n: int = field(
        default=4, metadata={"help": "Samples per prompt (best-of-n, rejection sampling, RLOO group size)."}
    )
    temperature: float = field(default=1.2, metadata={"help": "Sampling temperature of the candidates."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest sampled response."})
    eval_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of the held-out responses that are judged (every policy, and best-of-n's candidates there)."
        },
    )
    generation_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generate call (each with n sequences)."}
    )
    generation_backend: str = field(
        default="generate",
        metadata={"help": "generate | static (static KV cache) | continuous (transformers continuous batching)."},
    )
    stop_texts: list[str] = field(
        default_factory=lambda: ["\n\nHuman:"],
        metadata={"help": "Responses are cut at these texts (a base model may go on writing the dialogue)."},
    )
    rm_max_length: int = field(default=512, metadata={"help": "RM scoring: left truncation to this many RM tokens."})
    rm_batch_size: int = field(default=16, metadata={"help": "RM scoring batch size."})
    use_calibrated_rewards: bool = field(
        default=True,
        metadata={"help": "Divide rewards by the calibration stage's temperature when <rm>/temperature.json exists."},
    )
    # --- rejection sampling fine-tuning (the paper: batch 64, lr 1e-6, cosine, warmup 5%, 1 epoch)
    peft: str = field(
        default="none", metadata={"help": "none (full fine-tuning) | lora | qlora (4-bit NF4 base, bitsandbytes)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    sft_batch_size: int = field(
        default=64, metadata={"help": "RJS global batch size (gradient accumulation fills it)."}
    )
    sft_micro_batch_size: int = field(default=8, metadata={"help": "RJS per-device batch size."})
    sft_learning_rate: float = field(default=1e-6, metadata={"help": "RJS learning rate."})
    sft_lr_scheduler: str = field(default="cosine", metadata={"help": "RJS learning-rate schedule."})
    sft_warmup_ratio: float = field(default=0.05, metadata={"help": "RJS warmup, fraction of the steps."})
    sft_epochs: float = field(default=1.0, metadata={"help": "RJS epochs."})
    sft_max_length: int = field(
        default=512, metadata={"help": "RJS: prompt + response tokens (the prompt is cut from the left)."}
    )
    sft_save_steps: int = field(
        default=0,
        metadata={"help": "RJS: keep a resumable checkpoint every N steps (0: none; an interrupted run restarts)."},
    )
    # --- RL
    ppo: dict = field(
        default_factory=dict,
        metadata={
            "keys": PPOConfig,
            "help": "Overrides of pipeline.align.ppo.PPOConfig (sampling settings default to this section's).",
        },
    )
    rloo: dict = field(
        default_factory=dict,
        metadata={
            "help": "Overrides of trl.RLOOConfig (e.g. max_steps, learning_rate, beta, per_device_train_batch_size)."
        },
    )
    # --- judging
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "How policies are compared."})
    comparisons: list[str] = field(
        default_factory=lambda: ["more vs multitask", "more vs base", "multitask vs base"],
        metadata={"help": "'<a> vs <b>' with RM names or 'base'; judged for every method."},
    )
    progress: bool = field(default=True, metadata={"help": "Progress bars."})

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"align.methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
        if self.peft not in ("none", "lora", "qlora"):
            raise ValueError(f"align.peft must be none, lora or qlora, got {self.peft!r}")
        if self.peft == "qlora" and "ppo" in self.methods:
            raise ValueError(
                "align.peft=qlora is not supported by ppo (it trains LoRA on a full-precision policy): "
                "use align.peft=lora, or run ppo in a separate recipe"
            )
        if self.prompt_style not in ("raw", "alpaca"):
            raise ValueError(f"align.prompt_style must be raw or alpaca, got {self.prompt_style!r}")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("align.n and align.max_new_tokens must be >= 1")
        for c in self.comparisons:
            parse_comparison(c)
        if isinstance(self.judge, dict):
            self.judge = JudgeConfig(**self.judge)


def parse_comparison(text: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(" vs ")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ValueError(f"align.comparisons: {text!r} is not of the form '<a> vs <b>' (RM names or 'base')")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------
# small pure helpers


def select_rms(index: dict, wanted: list[str] | None) -> list[str]:
    """RM names to align with: `wanted`, or every RM of the index except single-source ones."""
    if wanted is None:
        names = [n for n in index if not n.startswith("single-")]
    else:
        missing = [n for n in wanted if n not in index]
        if missing:
            raise ValueError(f"align.rms: {missing} not in DIR/reward/index.json (it has {list(index)})")
        names = list(wanted)
    if not names:
        raise ValueError(
            "align: no reward model to align with (DIR/reward/index.json lists none besides single-source RMs)"
        )
    return names


def distinct_prompts(prompts, n: int | None, seed: int) -> list[str]:
    """Distinct prompts in first-seen order, then a seeded sample of `n` of them (all when n is None)."""
    seen = list(dict.fromkeys(prompts))
    if n is not None and n < len(seen):
        idx = sorted(random.Random(seed).sample(range(len(seen)), n))
        seen = [seen[i] for i in idx]
    return seen


def gold_summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def _plain(obj):
    """JSON-normal form (tuples become lists), so stored settings compare equal to fresh ones."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rm_stamp(rm_dir: Path) -> list:
    """Identity of an RM's weights and temperature by content (a retrained RM, or one edited in place,
    invalidates the alignments made with it); content hashes are cached (`pipeline.io.content_sha256`)."""
    out = []
    for name in ("model.safetensors", "adapter_model.safetensors", "temperature.json"):
        p = rm_dir / name
        if p.exists():
            out.append([name, p.stat().st_size, content_sha256(p)])
    return out


# ---------------------------------------------------------------------------------------------------
# the stage


class _Ctx:
    """Everything the sub-steps share (kept small and explicit)."""

    def __init__(self, recipe, run_dir: Path):
        from accelerate import PartialState

        self.recipe, self.cfg, self.seed = recipe, recipe.align, int(recipe.seed)
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "align"
        self.state = PartialState()
        self.main = self.state.is_main_process
        import torch

        self.device = self.state.device if torch.cuda.is_available() else torch.device("cpu")
        self.conversations: dict = {}  # prompt text -> '{"prompt": [messages]}' for conversational prompts

    def barrier(self):
        self.state.wait_for_everyone()

    def log(self, msg: str):
        if self.main:
            print(f"[align] {msg}", flush=True)


def _load_splits(recipe) -> dict:
    from pipeline.data import build_splits

    return build_splits(recipe.data)


def _synthetic_config(recipe):
    from pipeline.data.synthetic import SyntheticConfig

    return getattr(recipe.data, "synthetic", None) or SyntheticConfig(seed=int(recipe.seed))


def _is_synthetic(splits: dict, sources) -> bool:
    return all("gold_prob" in splits[s]["test"].column_names for s in sources if s in splits)


def _pick_sources(splits: dict, wanted: list[str], what: str) -> list[str]:
    missing = [s for s in wanted if s not in splits]
    if missing or not wanted:
        raise ValueError(
            f"align.{what}: {missing or wanted} not among the data sources of this run "
            f"{list(splits)}. Fix: name sources from that list"
        )
    return list(wanted)


def build_base_policy(ctx: _Ctx) -> tuple[str, object, str]:
    """Path of the base policy, its tokenizer, and a stamp of what built it (downstream caches key on it).

    The tiny synthetic policy is built once per set of warm-start settings, atomically; changing any of
    them rebuilds it (and so re-samples every candidate that came from it).
    """
    from pipeline.models import load_tokenizer

    cfg = ctx.cfg
    from pipeline.data.render import chat_template_text, set_chat_template

    if cfg.model_name_or_path:
        tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        set_chat_template(tok, cfg.chat_template, where="align.chat_template")
        stamp = [cfg.model_name_or_path, tok.chat_template] if tok.chat_template else cfg.model_name_or_path
        return cfg.model_name_or_path, tok, _fingerprint(stamp)
    path = ctx.dir / "base" / "policy"
    stamp = _fingerprint(
        _plain(
            {
                "synthetic": _synthetic_config(ctx.recipe),
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
        )
    )
    stamp_file = ctx.dir / "base" / "policy.settings.json"
    built = (path / "config.json").exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp
    if ctx.main and not built:
        from pipeline.align.policy import warm_start_policy
        from pipeline.data.synthetic import synthetic_corpus, synthetic_prompts, synthetic_responses
        from pipeline.models import TinyModelSpec, tiny_tokenizer

        ctx.log("building the tiny base policy (warm start on synthetic responses of mixed quality)")
        template = (
            None if cfg.chat_template is None else chat_template_text(cfg.chat_template, where="align.chat_template")
        )
        tok = tiny_tokenizer(
            synthetic_corpus(_synthetic_config(ctx.recipe)), vocab_size=cfg.policy_vocab_size, chat_template=template
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
    ctx.barrier()
    return str(path), load_tokenizer(str(path)), stamp


def _templated_warm_start(tok, prompt: str, response: str) -> tuple[str, str]:
    """A synthetic HH-layout (prompt, response) as the template's (generation prompt, assistant turn)."""
    from pipeline.data.render import plain_to_messages, render_response

    conv = json.dumps({"prompt": plain_to_messages(prompt)})
    p, c, _ = render_response(tok, prompt, response, conv)
    return p, c


def policy_prompt(tok, rec: dict, style: str) -> tuple[str, bool]:
    """(text the policy sees, templated) for a prompt record: the policy's chat template for conversational
    prompts when it has one (pipeline.data.render), else `format_prompt` (raw HH layout or Alpaca)."""
    from pipeline.align.generate import format_prompt
    from pipeline.data.render import render_prompt

    text, templated = render_prompt(tok, rec["prompt"], rec.get("conversation"))
    if templated:
        if style != "raw":
            raise ValueError(
                f"align.prompt_style={style!r} is for text prompts; this policy renders conversational "
                "prompts with its chat template. Fix: align.prompt_style=raw, or align.chat_template=none "
                "to use the plain layout with the prompt style"
            )
        return text, True
    return format_prompt(text, style), False


def turn_stops(tok) -> dict:
    """Extra stops for a chat-templated policy: its end-of-turn token (when one token) and text; {} without."""
    from pipeline.data.render import end_of_turn_text

    eot = end_of_turn_text(tok)
    if not eot:
        return {}
    ids = tok(eot, add_special_tokens=False)["input_ids"]
    return {"stop_token_ids": tuple(ids) if len(ids) == 1 else (), "extra_stop_texts": (eot,)}


def prompt_conversations(ds) -> dict:
    """{prompt text: '{"prompt": [messages]}'} for the conversational rows of a split ({} for text rows)."""
    if "conversation" not in ds.column_names:
        return {}
    out = {}
    for p, c in zip(ds["prompt"], ds["conversation"]):
        if c and p not in out:
            out[p] = json.dumps({"prompt": json.loads(c)["prompt"]}, ensure_ascii=False)
    return out


def _sample_kwargs(cfg: AlignConfig, *, temperature: float, n: int) -> dict:
    return dict(
        n=n,
        temperature=temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.generation_batch_size,
        max_prompt_length=cfg.max_prompt_length,
        stop_texts=tuple(cfg.stop_texts),
        backend=cfg.generation_backend,
        progress=cfg.progress,
    )


def _stops(ctx: _Ctx, tok, templated) -> dict:
    """sample() kwargs that stop a chat-templated policy at its end-of-turn token/text (templated prompts)."""
    stops = turn_stops(tok) if any(templated) else {}
    out = {"add_special_tokens": [not t for t in templated] if any(templated) else True}
    if stops:
        out["stop_token_ids"] = stops["stop_token_ids"]
        out["stop_texts"] = tuple(ctx.cfg.stop_texts) + stops["extra_stop_texts"]
    return out


def _candidates(
    ctx: _Ctx, name: str, policy_path: str, tok, raw_prompts: list[dict], *, temperature: float, settings: dict
):
    """n samples per prompt from the base policy, cached in DIR/align/base/<name>.jsonl (main process)."""
    from pipeline.align.generate import sample
    from pipeline.align.methods import load_policy, read_jsonl, write_jsonl

    path = ctx.dir / "base" / f"{name}.jsonl"
    stamp = ctx.dir / "base" / f"{name}.settings.json"
    if ctx.main and not (path.exists() and stamp.exists() and json.loads(stamp.read_text()) == settings):
        ctx.log(
            f"sampling {ctx.cfg.n} candidates for {len(raw_prompts)} {name.split('_')[0]} prompts from the base policy"
        )
        model = load_policy(policy_path, trust_remote_code=ctx.cfg.trust_remote_code).to(ctx.device)
        rendered = [policy_prompt(tok, r, ctx.cfg.prompt_style) for r in raw_prompts]
        prompts, templated = [t for t, _ in rendered], [f for _, f in rendered]
        kwargs = _sample_kwargs(ctx.cfg, temperature=temperature, n=ctx.cfg.n) | _stops(ctx, tok, templated)
        out = sample(model, tok, prompts, seed=ctx.seed, **kwargs)
        recs = [
            dict(r, policy_prompt=p, candidates=c, ended=e) | ({"templated": True} if f else {})
            for r, p, f, c, e in zip(raw_prompts, prompts, templated, out.texts, out.ended)
        ]
        write_jsonl(path, recs)
        atomic_write_json(stamp, settings)
        del model
    ctx.barrier()
    return read_jsonl(path)


def _eval_records(ctx: _Ctx, policy_path: str, tok, eval_cands: list[dict]) -> list[dict]:
    """One held-out response per prompt from a trained policy (same prompts and seed as the base)."""
    from pipeline.align.generate import sample
    from pipeline.align.methods import load_policy

    model = load_policy(policy_path, trust_remote_code=ctx.cfg.trust_remote_code).to(ctx.device)
    kwargs = _sample_kwargs(ctx.cfg, temperature=ctx.cfg.eval_temperature, n=1)
    kwargs |= _stops(ctx, tok, [bool(r.get("templated")) for r in eval_cands])
    out = sample(model, tok, [r["policy_prompt"] for r in eval_cands], seed=ctx.seed + 1, **kwargs)
    return [
        _with_conv({"prompt": r["prompt"], "set": r["set"], "response": t[0], "ended": e[0]}, r)
        for r, t, e in zip(eval_cands, out.texts, out.ended)
    ]


def _with_conv(rec: dict, src: dict) -> dict:
    """`rec` plus `src`'s prompt messages (conversational prompts), for judges that take messages."""
    return rec | ({"conversation": src["conversation"]} if src.get("conversation") else {})


def _perplexities(ctx: _Ctx, policy_path: str, tok, ppl_data: dict) -> dict:
    from pipeline.align.methods import load_policy
    from pipeline.align.perplexity import response_perplexity
    from pipeline.data.render import render_response

    model = load_policy(policy_path, trust_remote_code=ctx.cfg.trust_remote_code).to(ctx.device)
    out = {}
    for src, (prompts, answers) in ppl_data.items():
        convs = ctx.conversations
        texts = [
            policy_prompt(tok, {"prompt": p, "conversation": convs.get(p)}, ctx.cfg.prompt_style)[0] for p in prompts
        ]
        answers = [
            render_response(tok, p, a, convs.get(p))[1] if convs.get(p) else a for p, a in zip(prompts, answers)
        ]
        ppl = response_perplexity(
            model, tok, texts, answers, max_length=ctx.cfg.max_prompt_length + ctx.cfg.max_new_tokens
        )
        out[src] = ppl if math.isfinite(ppl) else None  # JSON null, not NaN
    return out


def _rm_reward(ctx: _Ctx, rm_dir: Path):
    from pipeline.align.rewards import RMReward

    return RMReward(
        str(rm_dir),
        max_length=ctx.cfg.rm_max_length,
        batch_size=ctx.cfg.rm_batch_size,
        temperature="auto" if ctx.cfg.use_calibrated_rewards else 1.0,
        device=ctx.device,
        name=rm_dir.name,
        conversations=ctx.conversations,
    )


def align_one(
    ctx: _Ctx,
    rm: str,
    rm_dir: Path,
    method: str,
    base_path: str,
    tok,
    train_cands,
    eval_cands,
    ppl_data: dict,
    gold_fn,
    settings: dict,
) -> None:
    """Produce DIR/align/<rm>/<method>/ (atomically) unless it exists with the same settings."""
    from pipeline.align import methods as M

    cfg = ctx.cfg
    final = inside(ctx.run_dir, ctx.dir / safe_component(rm) / method)
    if (final / "settings.json").exists() and json.loads((final / "settings.json").read_text()) == settings:
        ctx.log(f"{rm}/{method}: done earlier, skipping")
        return
    ctx.log(f"{rm}/{method}: aligning")
    work = inside(ctx.run_dir, ctx.dir / ".work" / safe_component(rm) / method)
    if ctx.main:
        work.mkdir(parents=True, exist_ok=True)
        stamp = work / "settings.json"
        if stamp.exists() and json.loads(stamp.read_text()) != settings:
            remove_tree(work, ctx.run_dir)  # stale partial work from other settings
            work.mkdir(parents=True)
        atomic_write_json(stamp, settings)
    ctx.barrier()
    reward = _rm_reward(ctx, rm_dir)
    prompts = [r["policy_prompt"] for r in train_cands]
    raw = [r["prompt"] for r in train_cands]
    # a chat-templated policy's end-of-turn token ends RL rollouts too
    stop_ids = turn_stops(tok).get("stop_token_ids", ()) if any(r.get("templated") for r in train_cands) else ()

    records = None
    if method in ("best_of_n", "rjs"):
        if ctx.main and not (work / "samples.jsonl").exists():
            scores = M.score_candidates(reward, raw, [r["candidates"] for r in train_cands])
            records = M.best_of_n_records(
                raw, [r["candidates"] for r in train_cands], scores, [r["ended"] for r in train_cands]
            )
            for rec, r in zip(records, train_cands):
                rec["set"] = r["set"]
            M.write_jsonl(work / "samples.jsonl", records)
        ctx.barrier()
        records = M.read_jsonl(work / "samples.jsonl")

    policy_path = None
    if method == "rjs":
        if not (work / "train_log.json").exists():  # written last, once the policy is saved
            best = [rec["candidates"][rec["chosen"]] for rec in records]
            best = [_sft_completion(tok, r, b) for r, b in zip(train_cands, best)]
            dataset = M.rjs_dataset(tok, prompts, best, cfg.sft_max_length)
            args = M.sft_config(
                work / ".trainer",
                batch_size=cfg.sft_batch_size,
                micro_batch_size=cfg.sft_micro_batch_size,
                learning_rate=cfg.sft_learning_rate,
                lr_scheduler=cfg.sft_lr_scheduler,
                warmup_ratio=cfg.sft_warmup_ratio,
                epochs=cfg.sft_epochs,
                max_length=cfg.sft_max_length,
                seed=ctx.seed,
                save_steps=cfg.sft_save_steps,
            )
            M.run_rjs(
                base_path,
                tok,
                dataset,
                args,
                work,
                peft=cfg.peft,
                lora=_lora(cfg),
                trust_remote_code=cfg.trust_remote_code,
            )
        policy_path = str(work / "policy")
    elif method == "rloo":
        if not (work / "train_log.json").exists():  # written last, once the policy is saved
            M.run_rloo(
                base_path,
                tok,
                prompts,
                raw,
                reward,
                work,
                n=cfg.n,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                seed=ctx.seed,
                overrides=cfg.rloo,
                gold_fn=gold_fn,
                peft=cfg.peft,
                lora=_lora(cfg),
                trust_remote_code=cfg.trust_remote_code,
                stop_token_ids=stop_ids,
            )
        policy_path = str(work / "policy")
    elif method == "ppo":
        defaults = dict(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_prompt_length=cfg.max_prompt_length,
            seed=ctx.seed,
            progress=cfg.progress,
            use_peft=cfg.peft == "lora",
        )
        if stop_ids:
            defaults["stop_token_ids"] = list(stop_ids)
        M.run_ppo(
            base_path,
            tok,
            prompts,
            raw,
            reward,
            work,
            overrides=cfg.ppo,
            defaults=defaults,
            gold_fn=gold_fn,
            trust_remote_code=cfg.trust_remote_code,
        )
        policy_path = str(work / "policy")
    ctx.barrier()

    if ctx.main:
        if method == "best_of_n":  # the RM picks among the base policy's held-out candidates
            scores = M.score_candidates(
                reward, [r["prompt"] for r in eval_cands], [r["candidates"] for r in eval_cands]
            )
            evals = []
            for r, row in zip(eval_cands, scores):
                k = int(np.nanargmax(row))
                evals.append(
                    _with_conv(
                        {
                            "prompt": r["prompt"],
                            "set": r["set"],
                            "response": r["candidates"][k],
                            "ended": r["ended"][k],
                            "scores": [float(x) for x in row],
                            "chosen": k,
                        },
                        r,
                    )
                )
            ppl = None  # the policy is the base policy
        else:
            evals = _eval_records(ctx, policy_path, tok, eval_cands)
            ppl = _perplexities(ctx, policy_path, tok, ppl_data)
        with atomic_dir(final) as tmp:
            for item in work.iterdir():
                if item.name in (".trainer", "checkpoint", ".adapter", "settings.json"):
                    continue
                shutil.move(str(item), tmp / item.name)
            M.write_jsonl(tmp / "eval.jsonl", evals)
            if ppl is not None:
                atomic_write_json(tmp / "perplexity.json", ppl)
            atomic_write_json(tmp / "settings.json", settings)
        remove_tree(work, ctx.run_dir)
    del reward
    gc.collect()
    ctx.barrier()


def _sft_completion(tok, rec: dict, response: str) -> str:
    """The SFT completion for a chosen sample: under the policy's template, the assistant turn with its
    end-of-turn markers (so the completion-only loss also teaches where a turn ends); else the text."""
    from pipeline.data.render import render_response

    if not rec.get("templated"):
        return response
    return render_response(tok, rec["prompt"], response, rec["conversation"])[1]


def _lora(cfg: AlignConfig) -> dict:
    return dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


def _policy_responses(ctx: _Ctx, who: str, method: str, base_eval: list[dict]) -> list[dict] | None:
    if who == "base":
        return base_eval
    path = ctx.dir / safe_component(who) / method / "eval.jsonl"
    if not path.exists():
        return None
    from pipeline.align.methods import read_jsonl

    return read_jsonl(path)


def judge_all(ctx: _Ctx, rms: list[str], base_eval: list[dict], gold_fn) -> tuple[dict, list[dict], dict]:
    """(judgements, per-comparison details, per-policy gold rewards per prompt set)."""
    from pipeline.align import judge as J

    cfg, jc = ctx.cfg, ctx.cfg.judge
    judgements, details, gold_means = {}, [], {}
    if jc.kind == "none":
        return judgements, details, gold_means
    gold_cache: dict[str, np.ndarray] = {}

    def gold_of(label: str, recs):
        if label not in gold_cache:
            gold_cache[label] = np.asarray(
                gold_fn([r["prompt"] for r in recs], [r["response"] for r in recs]), dtype=np.float64
            )
        return gold_cache[label]

    oa = None
    if jc.kind == "openai":
        oa = J.OpenAIJudge(
            jc.base_url,
            jc.model,
            api_key_env=jc.api_key_env or None,
            cache_path=ctx.dir / "judge_cache.jsonl",
            concurrency=jc.concurrency,
            max_requests=jc.max_requests,
            retries=jc.retries,
            backoff_s=jc.backoff_s,
            timeout_s=jc.timeout_s,
            max_tokens=jc.max_tokens,
            max_invalid=jc.max_invalid,
        )
    for method in cfg.methods:
        for comp in cfg.comparisons:
            a, b = parse_comparison(comp)
            skip = [x for x in (a, b) if x != "base" and x not in rms]
            if skip:
                ctx.log(f"comparison {comp!r}: {skip} not aligned in this run, skipped")
                continue
            ra, rb = _policy_responses(ctx, a, method, base_eval), _policy_responses(ctx, b, method, base_eval)
            if ra is None or rb is None:
                continue
            if [r["prompt"] for r in ra] != [r["prompt"] for r in rb]:
                raise RuntimeError(
                    f"{comp} ({method}): the two policies answered different prompts; delete DIR/align and rerun"
                )
            key = f"{method}: {a} vs {b}"
            if jc.kind == "gold":
                la, lb = ("base" if a == "base" else f"{a}/{method}"), ("base" if b == "base" else f"{b}/{method}")
                verdicts = J.gold_verdicts(gold_of(la, ra), gold_of(lb, rb), jc.tolerance)
                extra = [{"gold_a": float(x), "gold_b": float(y)} for x, y in zip(gold_of(la, ra), gold_of(lb, rb))]
            else:
                comps = [
                    J.Comparison(
                        json.loads(x["conversation"])["prompt"] if x.get("conversation") else x["prompt"],
                        x["response"],
                        y["response"],
                        "harmless" if "harmless" in x["set"] else "helpful",
                    )
                    for x, y in zip(ra, rb)
                ]
                res = oa.compare(comps, progress=cfg.progress)
                verdicts = [r["verdict"] for r in res]
                extra = [{"votes": r["votes"], "replies": r["replies"]} for r in res]
            sets = sorted({r["set"] for r in ra})
            judgements[key] = {s: J.summarize([v for v, r in zip(verdicts, ra) if r["set"] == s]) for s in sets}
            if len(sets) > 1:
                judgements[key]["all"] = J.summarize(verdicts)
            for v, x, y, e in zip(verdicts, ra, rb, extra):
                details.append(
                    {
                        "comparison": key,
                        "set": x["set"],
                        "prompt": x["prompt"],
                        "response_a": x["response"],
                        "response_b": y["response"],
                        "verdict": v,
                        **e,
                    }
                )
    for label, values in gold_cache.items():
        recs = base_eval  # every policy answered the same prompts in the same order
        gold_means[label] = {
            s: gold_summary([g for g, r in zip(values, recs) if r["set"] == s])
            for s in sorted({r["set"] for r in recs})
        }
        gold_means[label]["all"] = gold_summary(values)
    return judgements, details, gold_means


def render_table(judgements: dict, metrics: dict, judge_desc: str) -> str:
    lines = [
        f"## Alignment: win / tie / lose (judge: {judge_desc})",
        "",
        "| comparison | prompt set | win | tie | lose | n | win 95% CI | invalid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for comp, per_set in judgements.items():
        for s, r in per_set.items():
            lo, hi = r["interval"]["win"]
            pct = {k: "-" if r[k] is None else f"{r[k]:.1%}" for k in ("win", "tie", "lose")}
            lines.append(
                f"| {comp} | {s} | {pct['win']} | {pct['tie']} | {pct['lose']} | {r['n']} | "
                f"[{lo:.1%}, {hi:.1%}] | {r['counts']['invalid']} |"
            )
    if not judgements:
        lines.append("| (no comparison judged) | | | | | | | |")
    ppl_sources = sorted({s for m in metrics.values() for s in (m.get("perplexity") or {})})
    header = ["policy", "gold reward (mean ± se)"] + [f"PPL {s}" for s in ppl_sources]
    lines += ["", "## Policies", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in metrics.items():
        g = (m.get("gold") or {}).get("all")
        gold = "-" if not (g and g["n"]) else f"{g['mean']:.3f}" + (f" ± {g['se']:.3f}" if g["se"] is not None else "")
        ppl = m.get("perplexity") or {}
        cells = [name, gold] + [f"{ppl[s]:.2f}" if ppl.get(s) is not None else "-" for s in ppl_sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Align, judge, tabulate. Returns the artifact paths (relative to run_dir)."""
    from pipeline.align.methods import read_jsonl, write_jsonl
    from pipeline.align.rewards import gold_reward_fn
    from pipeline.reward.index import read_index

    ctx = _Ctx(recipe, run_dir)
    cfg = ctx.cfg
    index = read_index(ctx.run_dir, key="align.rms")
    rms = select_rms(index, cfg.rms)
    rm_dirs = {}
    for name in rms:
        p = Path(index[name]["path"])
        if not p.is_dir():
            raise FileNotFoundError(
                f"reward model {name!r}: directory {p} (from {ctx.run_dir / 'reward' / 'index.json'}) does not exist"
            )
        rm_dirs[name] = p

    splits = _load_splits(recipe)
    train_sources = _pick_sources(splits, cfg.prompt_sources, "prompt_sources")
    eval_sources = _pick_sources(splits, cfg.eval_sources, "eval_sources")
    synthetic = _is_synthetic(splits, eval_sources)
    gold_fn = None
    if cfg.judge.kind == "gold":
        if cfg.judge.gold == "synthetic" and not synthetic:
            raise ValueError(
                "align.judge.gold=synthetic needs the synthetic benchmark's data; for real data set "
                "align.judge.gold=<reward-model dir> or align.judge.kind=openai"
            )
        gold_fn = gold_reward_fn(cfg.judge.gold)
    elif synthetic:
        gold_fn = gold_reward_fn("synthetic")  # still logged as a measurement

    for s in dict.fromkeys(train_sources + eval_sources):  # conversational prompts keep their messages
        for part in ("train", "test"):
            ctx.conversations.update(prompt_conversations(splits[s][part]))

    def prompt_rec(p: str, s: str) -> dict:
        return {"prompt": p, "set": s} | ({"conversation": ctx.conversations[p]} if p in ctx.conversations else {})

    if gold_fn is not None and hasattr(gold_fn, "conversations"):  # an RM as gold judge: its own template too
        gold_fn.conversations = ctx.conversations
    train_prompts = []
    for i, s in enumerate(train_sources):
        per = None if cfg.n_prompts is None else -(-cfg.n_prompts // len(train_sources))
        train_prompts += [prompt_rec(p, s) for p in distinct_prompts(splits[s]["train"]["prompt"], per, ctx.seed + i)]
    if not train_prompts:
        raise ValueError(f"align: no training prompts in the train splits of {train_sources}")
    eval_prompts, ppl_data = [], {}
    for i, s in enumerate(eval_sources):
        test = splits[s]["test"]
        eval_prompts += [
            prompt_rec(p, s) for p in distinct_prompts(test["prompt"], cfg.n_eval_prompts, ctx.seed + 100 + i)
        ]
        m = min(cfg.n_ppl, len(test))
        ppl_data[s] = (list(test["prompt"][:m]), list(test["chosen"][:m]))

    base_path, tok, base_stamp = build_base_policy(ctx)
    base_settings = {
        "policy": [base_path, base_stamp],
        "style": cfg.prompt_style,
        "seed": ctx.seed,
        "sampling": _sample_kwargs(cfg, temperature=cfg.temperature, n=cfg.n) | {"progress": None},
    }
    train_cands = _candidates(
        ctx,
        "train_candidates",
        base_path,
        tok,
        train_prompts,
        temperature=cfg.temperature,
        settings=_plain(base_settings | {"prompts": _fingerprint(train_prompts)}),
    )
    eval_cands = _candidates(
        ctx,
        "eval_candidates",
        base_path,
        tok,
        eval_prompts,
        temperature=cfg.eval_temperature,
        settings=_plain(base_settings | {"temperature": cfg.eval_temperature, "prompts": _fingerprint(eval_prompts)}),
    )
    base_eval = [
        _with_conv({"prompt": r["prompt"], "set": r["set"], "response": r["candidates"][0], "ended": r["ended"][0]}, r)
        for r in eval_cands
    ]

    base_ppl_path = ctx.dir / "base" / "perplexity.json"
    ppl_stamp = _fingerprint(
        [base_path, base_stamp, cfg.prompt_style, {k: v[0][:3] for k, v in ppl_data.items()}, cfg.n_ppl]
    )
    if ctx.main and not (base_ppl_path.exists() and json.loads(base_ppl_path.read_text()).get("stamp") == ppl_stamp):
        atomic_write_json(
            base_ppl_path, {"stamp": ppl_stamp, "perplexity": _perplexities(ctx, base_path, tok, ppl_data)}
        )
    ctx.barrier()

    plain = dataclasses.asdict(cfg)
    for k in ("judge", "comparisons", "progress", "rms", "methods"):
        plain.pop(k, None)
    for rm in rms:
        for method in cfg.methods:
            settings = {
                "method": method,
                "rm": rm,
                "rm_stamp": _rm_stamp(rm_dirs[rm]),
                "config": plain,
                "seed": ctx.seed,
                "train": _fingerprint(train_cands),
                "eval": _fingerprint(eval_cands),
            }
            align_one(
                ctx,
                rm,
                rm_dirs[rm],
                method,
                base_path,
                tok,
                train_cands,
                eval_cands,
                ppl_data,
                gold_fn,
                _fingerprint(settings),
            )

    artifacts = ["align/base", *[f"align/{safe_component(rm)}/{m}" for rm in rms for m in cfg.methods]]
    if ctx.main:
        judgements, details, gold_means = judge_all(ctx, rms, base_eval, gold_fn)
        metrics = {
            "base": {"perplexity": json.loads(base_ppl_path.read_text())["perplexity"], "gold": gold_means.get("base")}
        }
        for rm in rms:
            for m in cfg.methods:
                sub = ctx.dir / safe_component(rm) / m
                ppl = (
                    json.loads((sub / "perplexity.json").read_text())
                    if (sub / "perplexity.json").exists()
                    else metrics["base"]["perplexity"]
                )
                gold = gold_means.get(f"{rm}/{m}")
                if gold is None and gold_fn is not None:
                    recs = read_jsonl(sub / "eval.jsonl")
                    gold = {"all": gold_summary(gold_fn([r["prompt"] for r in recs], [r["response"] for r in recs]))}
                metrics[f"{rm}/{m}"] = {"perplexity": ppl, "gold": gold}
        if "base" not in gold_means and gold_fn is not None:
            metrics["base"]["gold"] = {
                "all": gold_summary(gold_fn([r["prompt"] for r in base_eval], [r["response"] for r in base_eval]))
            }
        judge_desc = {
            "gold": f"gold reward ({cfg.judge.gold}), tie tolerance {cfg.judge.tolerance}",
            "openai": f"{cfg.judge.model} via {cfg.judge.base_url}, both orders",
            "none": "none",
        }[cfg.judge.kind]
        atomic_write_json(ctx.dir / "judgements.json", judgements)
        write_jsonl(ctx.dir / "judge_details.jsonl", details)
        atomic_write_json(ctx.dir / "metrics.json", {"judge": judge_desc, "policies": metrics})
        atomic_write_text(ctx.dir / "table.md", render_table(judgements, metrics, judge_desc))
        remove_tree(ctx.dir / ".work", ctx.run_dir)
    ctx.barrier()
    artifacts += ["align/judgements.json", "align/judge_details.jsonl", "align/metrics.json", "align/table.md"]
    return artifacts


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the align section names besides the data sources: the base policy and a chat-template file."""
    return section_model_inputs(section)


def check(recipe, *, runs: bool, origin) -> None:
    """The align section against the others, before any work (also under --dry-run): its chat template;
    prompt/eval sources that `data.sources` has; RMs and comparisons that `reward.methods` trains; and, when the
    stage will run (`runs`), the OpenAI judge's API-key variable. One RecipeError naming the key and the fix."""
    check_template_setting(recipe.align.chat_template, "align.chat_template", origin)
    data, align = recipe.data, recipe.align
    grouped = [spec for spec in data.sources if isinstance(spec.options, dict) and spec.options.get("group_by")]
    # A `group_by` source becomes sources named <name>/<value> (or its group_names values) only once the data
    # is read: names of that shape pass here, and the data stage checks them against the groups it finds.
    group_names = {str(v) for spec in grouped for v in (spec.options.get("group_names") or {}).values()}
    sources = data.source_names

    def is_source(name: str) -> bool:
        return name in sources or name in group_names or any(str(name).startswith(f"{spec.name}/") for spec in grouped)

    for key in ("prompt_sources", "eval_sources"):
        unknown = [s for s in getattr(align, key) or [] if not is_source(s)]
        if unknown:
            raise RecipeError(
                f"align.{key} in {origin('align.' + key)} names unknown source(s) {unknown}; "
                f"the data sources are {sources}. Fix: use names from data.sources"
            )
    _check_rms_and_comparisons(recipe.reward.methods, sources, align, is_source, origin)
    env = align.judge.api_key_env
    if runs and align.judge.kind == "openai" and env and not os.environ.get(env):
        raise RecipeError(
            f"align.judge.kind=openai reads the API key from the environment variable {env}, which is not set, and "
            f"the align stage will run. Fix: export {env}=..., or set align.judge.api_key_env='' for an endpoint "
            "without a key, or align.judge.kind=gold"
        )


def _check_rms_and_comparisons(methods: list[str], sources: list[str], align, is_source, origin) -> None:
    trained = [n for m in methods for n in ([f"single-{s}" for s in sources] if m == "single" else [m])]
    if align.rms is not None:
        unknown = [n for n in align.rms if n not in trained and not (n.startswith("single-") and is_source(n[7:]))]
        if unknown:
            raise RecipeError(
                f"align.rms in {origin('align.rms')} names RM(s) {unknown} that reward.methods "
                f"does not train (it trains {trained}). Fix: use some of those, or null for all"
            )
    aligned = list(align.rms) if align.rms is not None else [n for n in trained if not n.startswith("single-")]
    for comp in align.comparisons or []:
        parts = [p.strip() for p in comp.split(" vs ")]
        unknown = [p for p in parts if p != "base" and p not in aligned]
        if unknown:
            raise RecipeError(
                f"align.comparisons in {origin('align.comparisons')}: {comp!r} names {unknown}, not an RM "
                f"aligned in this run ({aligned + ['base']}). Fix: compare only those, or add the RM to "
                "reward.methods / align.rms"
            )


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    """The align stage's counts from its settings: warm-start steps, samples to generate, RMs and methods."""
    cfg = recipe.align
    parts = []
    if not cfg.model_name_or_path:
        parts.append(f"{cfg.warm_start_steps} warm-start steps (tiny policy, unless already built)")
    rms = list(cfg.rms) if cfg.rms else [m for m in recipe.reward.methods if m != "single"]
    prompts = "all" if cfg.n_prompts is None else cfg.n_prompts
    parts.append(f"{len(rms)} RM(s) x methods {', '.join(cfg.methods)}")
    parts.append(f"sampling {prompts} training prompts x {cfg.n} responses")
    if "ppo" in cfg.methods:
        parts.append(f"ppo {cfg.ppo.get('num_steps', 100)} steps per RM")
    return "; ".join(parts), None
