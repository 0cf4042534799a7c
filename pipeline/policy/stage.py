"""The policy stage: the base policy every later use of a policy starts from, in DIR/policy/.

    python -m pipeline.policy --recipe tiny-cpu --output-dir runs/tiny

The base policy is `align.model_name_or_path` (a save_pretrained directory or hub id, e.g. Alpaca-7B) or, when
null, a tiny random causal LM warm-started on the synthetic benchmark's responses of mixed quality
(`pipeline.policy.warm_start.warm_start_policy`), built once per set of warm-start settings and saved to
DIR/policy/ (resumable from DIR/policy/.warm_start_checkpoints). DIR/policy/ always holds the tokenizer the
policy is used with (its chat template set) and `policy.json`: {"model": the model to load ("policy", i.e.
DIR/policy itself, for a built one; else the named model), "stamp": what built it}. Two stages start from
it: the align stage (best-of-n candidates, RJS, PPO, RLOO) and, when `reward.methods` has `dpo`, the reward
stage (DPO trains from it and is referenced against it). It is a stage of its own, before the reward stage,
so that both read one policy, built once, with its own fingerprint: the planner runs it whenever a selected
stage reads it (`read_by`), and only those stages follow it (a change of the warm start reruns align, and
the reward stage only when it trains `dpo`).

Its settings stay keys of the align section (`align.model_name_or_path`, `align.policy_*`,
`align.warm_start_*`, ...: `POLICY_KEYS`, the only part of that section its fingerprint covers), so recipes
are unchanged.

May import: pipeline leaves only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.io import atomic_dir, atomic_write_json, read_json, sha256_json
from pipeline.logs import say


POLICY_DIR = "policy"
POLICY_INFO = "policy.json"

# The align keys the base policy is built from: the policy stage's settings (its fingerprint covers these, and
# not the rest of the align section). `progress` and `warm_start_save_steps` cannot change the policy.
POLICY_KEYS = (
    "model_name_or_path",
    "chat_template",
    "trust_remote_code",
    "policy_vocab_size",
    "policy_arch",
    "policy_size",
    "warm_start_steps",
    "warm_start_lr",
    "warm_start_batch_size",
    "warm_start_prompts",
    "warm_start_responses",
    "max_prompt_length",
    "max_new_tokens",
)


def settings(resolved: dict) -> dict:
    """The part of the resolved recipe that is this stage's own settings (`pipeline.stages.Stage.settings`)."""
    align = resolved.get("align") or {}
    return {"align": {k: align.get(k) for k in POLICY_KEYS}}


def read_by(resolved: dict) -> list[str]:
    """The stages of this recipe that start from the base policy: align, and reward when it trains `dpo`."""
    methods = (resolved.get("reward") or {}).get("methods") or []
    return ["reward", "align"] if "dpo" in methods else ["align"]


def _plain(obj):
    """JSON-normal form (tuples become lists), so stored stamps compare equal to fresh ones."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------
# building and reading DIR/policy/


def run(recipe, run_dir: Path, *, force: bool = False) -> list[str]:
    """Build (or check and record) the base policy in DIR/policy/. Returns the artifact paths."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        build_base_policy(recipe, Path(run_dir), force=force)
    state.wait_for_everyone()
    return [POLICY_DIR]


def build_base_policy(recipe, run_dir: Path, force: bool = False) -> None:
    """DIR/policy/ for the recipe: a named model's tokenizer (its template set and checked) and policy.json, or the
    tiny synthetic policy, built once per set of warm-start settings, atomically; changing any of them (or
    `force`, --force policy) rebuilds it (and so re-samples every candidate that came from it)."""
    from pipeline.data.render import check_tokenizer_templates, set_chat_template
    from pipeline.models import load_tokenizer

    cfg = recipe.align
    path = Path(run_dir) / POLICY_DIR
    if cfg.model_name_or_path:
        tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        if cfg.chat_template is None:  # the tokenizer's own template is used: checked like a recipe's
            source = f"align.model_name_or_path ({cfg.model_name_or_path})"
            check_tokenizer_templates(tok.chat_template, source, "align.chat_template")
        set_chat_template(tok, cfg.chat_template, where="align.chat_template")
        stamp = [cfg.model_name_or_path, tok.chat_template] if tok.chat_template else cfg.model_name_or_path
        with atomic_dir(path) as tmp:
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / POLICY_INFO, {"model": cfg.model_name_or_path, "stamp": sha256_json(stamp)[:16]})
        return
    stamp = sha256_json(_plain(_tiny_policy_settings(recipe)))[:16]
    info = read_json(path / POLICY_INFO)
    if not (path / "config.json").exists() or not isinstance(info, dict):
        reason = ""
    elif force:
        reason = ": forced (--force policy)"
    elif info.get("stamp") == stamp:
        say("policy", f"the tiny base policy is built from these settings already ({path}): reusing it")
        return
    else:
        reason = ": its settings changed since it was made (or an older version of the pipeline made it)"
    say("policy", f"building the tiny base policy (warm start on synthetic responses of mixed quality){reason}")
    _build_tiny_policy(recipe, path, stamp)


def _tiny_policy_settings(recipe) -> dict:
    """Everything the tiny base policy is built from."""
    cfg = recipe.align
    return {
        "synthetic": recipe.data.synthetic,
        "vocab": cfg.policy_vocab_size,
        "arch": cfg.policy_arch,
        "size": cfg.policy_size,
        "steps": cfg.warm_start_steps,
        "lr": cfg.warm_start_lr,
        "batch": cfg.warm_start_batch_size,
        "prompts": cfg.warm_start_prompts,
        "responses": cfg.warm_start_responses,
        "seed": int(recipe.seed),
        "max_length": min(256, cfg.max_prompt_length + cfg.max_new_tokens),
        **({"chat_template": cfg.chat_template} if cfg.chat_template else {}),
    }


def _build_tiny_policy(recipe, path: Path, stamp: str) -> None:
    """Warm-start the tiny policy on the synthetic benchmark and save it (with its tokenizer and policy.json,
    whose `stamp` says what built it) to `path`, atomically; resumable from path/.warm_start_checkpoints while
    the settings stay `stamp`."""
    from pipeline.data.render import chat_template_text
    from pipeline.data.synthetic import synthetic_corpus, synthetic_prompts, synthetic_responses
    from pipeline.models import TinyModelSpec, tiny_tokenizer
    from pipeline.policy.warm_start import warm_start_policy

    cfg, seed = recipe.align, int(recipe.seed)
    template = (
        None if cfg.chat_template is None else chat_template_text(cfg.chat_template, where="align.chat_template")
    )
    tok = tiny_tokenizer(
        synthetic_corpus(recipe.data.synthetic), vocab_size=cfg.policy_vocab_size, chat_template=template
    )
    prompts = synthetic_prompts(cfg.warm_start_prompts, seed=seed, split="train")
    P, R = [], []
    for p in prompts:
        for r in synthetic_responses(p, cfg.warm_start_responses, seed=seed):
            if template:  # warm-start on the templated dialogue, so the policy learns the template's turns
                q, r = _templated_warm_start(tok, p, r)
                P.append(q)
            else:
                P.append(p)
            R.append(r)
    ckpt_dir = path / ".warm_start_checkpoints"
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
        seed=seed,
        max_length=min(256, cfg.max_prompt_length + cfg.max_new_tokens),
        progress=cfg.progress,
        checkpoint_dir=ckpt_dir,
        save_every=cfg.warm_start_save_steps,
    )
    with atomic_dir(path) as tmp:  # replaces the old policy and its checkpoints
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / POLICY_INFO, {"model": POLICY_DIR, "stamp": stamp})


def _templated_warm_start(tok, prompt: str, response: str) -> tuple[str, str]:
    """A synthetic HH-layout (prompt, response) as the template's (generation prompt, assistant turn)."""
    from pipeline.data.render import plain_to_messages, render_response

    conv = json.dumps({"prompt": plain_to_messages(prompt)})
    p, c, _ = render_response(tok, prompt, response, conv)
    return p, c


def read_policy(run_dir: Path, *, trust_remote_code: bool = False) -> tuple[str, object, str]:
    """(the model to load, its tokenizer, the stamp of what built it) from DIR/policy/, for the stages that start
    from the base policy; one clear error when the policy stage has not run."""
    from pipeline.models import load_tokenizer

    path = Path(run_dir) / POLICY_DIR
    info = read_json(path / POLICY_INFO)
    if not isinstance(info, dict) or "model" not in info:
        raise FileNotFoundError(
            f"{path / POLICY_INFO} not found: run the policy stage first (python -m pipeline.run --stages policy; "
            "pipeline.run adds it by itself to the stages that need it)"
        )
    model = str(path) if info["model"] == POLICY_DIR else info["model"]
    return model, load_tokenizer(str(path), trust_remote_code=trust_remote_code), info["stamp"]


def reference_of(run_dir: Path) -> str:
    """The base policy as a path relative to the run directory ("policy") when it was built here, else the
    named model (what a DPO policy's implicit.json names as its reference)."""
    info = read_json(Path(run_dir) / POLICY_DIR / POLICY_INFO) or {}
    return str(info.get("model") or POLICY_DIR)


# ---------------------------------------------------------------------------------------------------
# What the orchestrator asks before the stage runs (pipeline.stages.STAGES)


def inputs(section: dict) -> list[tuple[str, str]]:
    """Inputs the policy settings name besides the data sources: the named policy and a chat-template file."""
    from pipeline.models import section_model_inputs

    return section_model_inputs(section.get("align") or {})


def check(recipe, *, runs: bool, origin) -> None:
    """align.chat_template parses, and, when the stage runs, the templates a local align.model_name_or_path ships
    do (one RecipeError naming the key)."""
    from pipeline.data.render import check_template_setting
    from pipeline.models import check_saved_templates

    check_template_setting(recipe.align.chat_template, "align.chat_template", origin)
    if runs:
        check_saved_templates(recipe.align, "align", origin)


def estimate(recipe, run_dir: Path, world: int = 1) -> tuple[str, None]:
    cfg = recipe.align
    if cfg.model_name_or_path:
        return f"the named policy {cfg.model_name_or_path}: its tokenizer only, nothing trained", None
    return f"{cfg.warm_start_steps} warm-start steps (tiny policy, unless already built)", None
