"""The `align:` section of a recipe: `AlignConfig` (and its `judge:` subsection, `JudgeConfig`), with the checks
of their own values (`__post_init__`). Checks against other sections are `pipeline.align.stage.check`.

May import: pipeline leaves, `pipeline.calibration.compare` (the one '<a> vs <b>' parser), the PPO settings
(`pipeline.align.ppo.PPOConfig`) and the method table (`pipeline.align.methods.METHODS`, the valid names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.align.methods import METHODS
from pipeline.align.ppo import PPOConfig
from pipeline.align.ppo.config import TOP_P_MESSAGE
from pipeline.calibration.compare import parse_comparison
from pipeline.strict import COUNT, COUNT0, FRACTION, INT_MAX, NON_NEGATIVE, POSITIVE, TRAINING_ARGS_RANGES, Range


COMPARISON_SIDES = (
    "two different RM names or 'base' (judged for every method), or two policies '<rm>/<method>' or 'base'"
)


def comparison_policies(text: str) -> tuple[str, str, bool]:
    """'more vs multitask' -> ('more', 'multitask', False): judged for every method; 'dpo/policy vs more/rjs' ->
    ('dpo/policy', 'more/rjs', True): two named policies (or one and 'base'), judged once. One ValueError naming
    align.comparisons for a method that does not exist or a mix of the two forms."""
    a, b = parse_comparison(text, key="align.comparisons", names=COMPARISON_SIDES)
    named = [x for x in (a, b) if "/" in x]
    if not named:
        return a, b, False
    for x in named:
        rm, _, method = x.partition("/")
        if not rm or method not in METHODS:
            raise ValueError(
                f"align.comparisons: {text!r}: {x!r} is not a policy '<rm>/<method>' (methods: {', '.join(METHODS)})"
            )
    if len(named) == 1 and "base" not in (a, b):
        plain = b if "/" in a else a
        raise ValueError(
            f"align.comparisons: {text!r} mixes a policy with the RM name {plain!r}; name both policies, e.g. "
            f"'{named[0]} vs {plain}/best_of_n', or two RMs ('more vs multitask', judged for every method)"
        )
    return a, b, True


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
        default=0.0,
        metadata={
            "range": NON_NEGATIVE,
            "help": "For kind=gold: a tie when the gold rewards differ by at most this much.",
        },
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
    concurrency: int = field(default=4, metadata={"range": COUNT, "help": "For kind=openai: parallel requests."})
    max_requests: int = field(
        default=6000,
        metadata={
            "range": COUNT0,
            "help": "For kind=openai: request budget of one run (retries count); cached answers are free. Checked "
            "before any work against what the run needs (--dry-run shows it). The default covers the default "
            "section (2 methods x 3 comparisons x 2 prompt sets x 200 prompts x 2 orders + 10% for retries).",
        },
    )
    retries: int = field(
        default=4,
        metadata={"range": COUNT0, "help": "For kind=openai: retries of a failed request (exponential backoff)."},
    )
    backoff_s: float = field(
        default=1.0,
        metadata={
            "range": NON_NEGATIVE,
            "help": "For kind=openai: first retry delay in seconds (doubles each retry).",
        },
    )
    timeout_s: float = field(
        default=60.0,
        metadata={
            "range": POSITIVE,
            "help": "For kind=openai: deadline of one whole request (connect, headers, body) in seconds; a request past it is retried.",
        },
    )
    max_tokens: int = field(default=256, metadata={"range": COUNT, "help": "For kind=openai: longest judge reply."})
    max_invalid: int = field(
        default=8,
        metadata={
            "range": COUNT0,
            "help": "For kind=openai: replies without an A/B verdict in a row that fail the stage (a judge model "
            "that does not follow the instruction); 0 = never fail, count them as invalid.",
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
            "help": "Methods to run: best_of_n, rjs, ppo (experimental), rloo (TRL's RLOOTrainer: the supported RL "
            "method), policy (an implicit RM's own policy, i.e. the DPO policy of reward.methods=dpo, answers the "
            "held-out prompts; skipped for classic RMs). An implicit RM scores by beta * log(pi / pi_ref)."
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
            "range": COUNT,
            "help": "Tiny policy: vocabulary of its locally trained tokenizer (differs from the RMs' on purpose).",
        },
    )
    warm_start_steps: int = field(
        default=300, metadata={"range": COUNT0, "help": "Tiny policy: optimizer steps of the warm start."}
    )
    warm_start_lr: float = field(default=3e-3, metadata={"help": "Tiny policy: warm-start learning rate."})
    warm_start_batch_size: int = field(
        default=32, metadata={"range": COUNT, "help": "Tiny policy: warm-start batch size."}
    )
    warm_start_save_steps: int = field(
        default=50,
        metadata={
            "range": COUNT0,
            "help": "Tiny policy: keep a resumable warm-start checkpoint every N steps (0: none; an interrupted "
            "warm start then restarts from step 0).",
        },
    )
    warm_start_prompts: int = field(
        default=400, metadata={"range": COUNT, "help": "Tiny policy: synthetic prompts of the warm start."}
    )
    warm_start_responses: int = field(
        default=4,
        metadata={"range": COUNT, "help": "Tiny policy: synthetic responses (mixed quality) per warm-start prompt."},
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
        default=1024, metadata={"range": COUNT, "help": "Training prompts (distinct, seeded sample); null = all."}
    )
    n_eval_prompts: int = field(default=200, metadata={"range": COUNT, "help": "Held-out prompts per prompt set."})
    n_ppl: int = field(
        default=500,
        metadata={"range": COUNT0, "help": "Test answers (chosen responses) per source for the perplexity."},
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
        default=4,
        metadata={"range": COUNT, "help": "Samples per prompt (best-of-n, rejection sampling, RLOO group size)."},
    )
    best_of_n_sizes: list[int] = field(
        default_factory=list,
        metadata={
            "range": COUNT,
            "help": "Best-of-n also at these N (each <= align.n): the best of the FIRST N of the n candidates of each "
            "held-out prompt, nested subsets of one draw (e.g. n=64 with [4, 16, 64]); align/metrics.json gives "
            "each best-of-n policy's gold reward per N (gold_at). [] = only N = n.",
        },
    )
    rjs_n: int | None = field(
        default=None,
        metadata={
            "range": COUNT,
            "help": "Rejection sampling fine-tunes on the best of the FIRST rjs_n of the n candidates of each training "
            "prompt (<= align.n; the paper's RJS: 4); null = all n. Lets one draw of n = 64 serve best-of-64 and "
            "RJS at its own N.",
        },
    )
    temperature: float = field(default=1.2, metadata={"help": "Sampling temperature of the candidates."})
    top_p: float = field(
        default=1.0, metadata={"range": Range(0, 1, lo_open=True), "help": "Nucleus sampling threshold."}
    )
    max_new_tokens: int = field(default=256, metadata={"range": COUNT, "help": "Longest sampled response."})
    eval_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature of the held-out responses that are judged (every policy, and best-of-n's candidates there)."
        },
    )
    generation_batch_size: int = field(
        default=16, metadata={"range": COUNT, "help": "Prompts per generate call (each with n sequences)."}
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
    rm_batch_size: int = field(default=16, metadata={"range": COUNT, "help": "RM scoring batch size."})
    use_calibrated_rewards: bool = field(
        default=True,
        metadata={"help": "Divide rewards by the calibration stage's temperature when <rm>/temperature.json exists."},
    )
    # --- rejection sampling fine-tuning (the paper: batch 64, lr 1e-6, cosine, warmup 5%, 1 epoch)
    peft: str = field(
        default="none", metadata={"help": "none (full fine-tuning) | lora | qlora (4-bit NF4 base, bitsandbytes)."}
    )
    lora_r: int = field(default=16, metadata={"range": COUNT, "help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"range": COUNT, "help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"range": Range(0, 1, hi_open=True), "help": "LoRA dropout."})
    sft_batch_size: int = field(
        default=64, metadata={"range": COUNT, "help": "RJS global batch size (gradient accumulation fills it)."}
    )
    sft_micro_batch_size: int = field(default=8, metadata={"range": COUNT, "help": "RJS per-device batch size."})
    sft_learning_rate: float = field(default=1e-6, metadata={"help": "RJS learning rate."})
    sft_lr_scheduler: str = field(default="cosine", metadata={"help": "RJS learning-rate schedule."})
    sft_warmup_ratio: float = field(
        default=0.05, metadata={"range": FRACTION, "help": "RJS warmup, fraction of the steps."}
    )
    sft_epochs: float = field(default=1.0, metadata={"range": Range(0, INT_MAX, lo_open=True), "help": "RJS epochs."})
    sft_max_length: int = field(
        default=512, metadata={"help": "RJS: prompt + response tokens (the prompt is cut from the left)."}
    )
    sft_save_steps: int = field(
        default=0,
        metadata={
            "range": COUNT0,
            "help": "RJS: keep a resumable checkpoint every N steps (0: none; an interrupted run restarts).",
        },
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
            "ranges": TRAINING_ARGS_RANGES,
            "help": "Overrides of trl.RLOOConfig (e.g. max_steps, learning_rate, beta, per_device_train_batch_size).",
        },
    )
    # --- judging
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "How policies are compared."})
    comparisons: list[str] = field(
        default_factory=lambda: ["more vs multitask", "more vs base", "multitask vs base"],
        metadata={
            "help": "'<a> vs <b>' with RM names or 'base', judged for every method ('more vs multitask'), or with two "
            "policies '<rm>/<method>' (or one and 'base'), judged once: 'dpo/policy vs more/best_of_n' compares "
            "methods. With the gold judge each judgement has the paired gold-reward difference and its interval."
        },
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
        if too_big := [k for k in self.best_of_n_sizes if k > self.n]:
            raise ValueError(
                f"align.best_of_n_sizes {too_big} exceed align.n = {self.n}: best-of-N takes the first N of the n "
                "candidates drawn per prompt. Fix: raise align.n to the largest N, or drop those sizes"
            )
        if self.rjs_n is not None and self.rjs_n > self.n:
            raise ValueError(
                f"align.rjs_n = {self.rjs_n} exceeds align.n = {self.n}: rejection sampling picks among the first "
                "rjs_n of the n candidates drawn per prompt. Fix: raise align.n, lower align.rjs_n, or null"
            )
        top_p = self.ppo.get("top_p", self.top_p) if isinstance(self.ppo, dict) else self.top_p
        if "ppo" in self.methods and top_p != 1.0:
            where = "align.ppo.top_p" if "top_p" in (self.ppo or {}) else "align.top_p (ppo's default)"
            raise ValueError(f"{where}: " + TOP_P_MESSAGE.format(top_p=top_p))
        for c in self.comparisons:
            comparison_policies(c)
        if isinstance(self.judge, dict):
            self.judge = JudgeConfig(**self.judge)
