"""What the alignment stage samples and measures: the base policy's candidates (n samples per prompt, sampled
once and shared by every RM), a trained policy's held-out responses, perplexities of the test answers, the RM
reward that scores samples, and the JSONL files all of them are kept in.

May import: pipeline leaves, `pipeline.reward.index` (an implicit RM's descriptor) and
`pipeline.align.{context, generate, perplexity, policy, prompts, rewards}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from pipeline.align.context import AlignContext, rerun_reason, why
from pipeline.align.prompts import policy_prompt, turn_stops
from pipeline.io import atomic_write_json, atomic_write_text


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


def sample_kwargs(cfg, *, temperature: float, n: int) -> dict:
    """`pipeline.align.generate.sample` settings from the align section `cfg`."""
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


def _stops(ctx: AlignContext, tok, templated) -> dict:
    """sample() kwargs that stop a chat-templated policy at its end-of-turn token/text (templated prompts)."""
    stops = turn_stops(tok) if any(templated) else {}
    out = {"add_special_tokens": [not t for t in templated] if any(templated) else True}
    if stops:
        out["stop_token_ids"] = stops["stop_token_ids"]
        out["stop_texts"] = tuple(ctx.cfg.stop_texts) + stops["extra_stop_texts"]
    return out


def candidates(
    ctx: AlignContext, name: str, policy_path: str, tok, raw_prompts: list[dict], *, temperature: float, settings: dict
):
    """n samples per prompt from the base policy, cached in DIR/align/base/<name>.jsonl (main process)."""
    from pipeline.align.generate import sample
    from pipeline.align.policy import load_policy

    path = ctx.dir / "base" / f"{name}.jsonl"
    settings_file = ctx.dir / "base" / f"{name}.settings.json"
    if ctx.main and (reason := rerun_reason(settings_file, settings, path)):
        what = f"{ctx.cfg.n} candidates for {len(raw_prompts)} {name.split('_')[0]} prompts"
        ctx.log(f"sampling {what} from the base policy{why(reason)}")
        model = load_policy(policy_path, trust_remote_code=ctx.cfg.trust_remote_code).to(ctx.device)
        rendered = [policy_prompt(tok, r, ctx.cfg.prompt_style) for r in raw_prompts]
        prompts, templated = [t for t, _ in rendered], [f for _, f in rendered]
        kwargs = sample_kwargs(ctx.cfg, temperature=temperature, n=ctx.cfg.n) | _stops(ctx, tok, templated)
        out = sample(model, tok, prompts, seed=ctx.seed, **kwargs)
        recs = [
            dict(r, policy_prompt=p, candidates=c, ended=e) | ({"templated": True} if f else {})
            for r, p, f, c, e in zip(raw_prompts, prompts, templated, out.texts, out.ended)
        ]
        write_jsonl(path, recs)
        atomic_write_json(settings_file, settings)
        del model
    ctx.barrier()
    return read_jsonl(path)


def with_conv(rec: dict, src: dict) -> dict:
    """`rec` plus `src`'s prompt messages (conversational prompts), for judges that take messages."""
    return rec | ({"conversation": src["conversation"]} if src.get("conversation") else {})


def eval_records(ctx: AlignContext, policy_path: str, tok, eval_cands: list[dict]) -> list[dict]:
    """One held-out response per prompt from a trained policy (same prompts and seed as the base)."""
    from pipeline.align.generate import sample
    from pipeline.align.policy import load_policy

    model = load_policy(policy_path, trust_remote_code=ctx.cfg.trust_remote_code).to(ctx.device)
    kwargs = sample_kwargs(ctx.cfg, temperature=ctx.cfg.eval_temperature, n=1)
    kwargs |= _stops(ctx, tok, [bool(r.get("templated")) for r in eval_cands])
    out = sample(model, tok, [r["policy_prompt"] for r in eval_cands], seed=ctx.seed + 1, **kwargs)
    return [
        with_conv({"prompt": r["prompt"], "set": r["set"], "response": t[0], "ended": e[0]}, r)
        for r, t, e in zip(eval_cands, out.texts, out.ended)
    ]


def perplexities(ctx: AlignContext, policy_path: str, tok, ppl_data: dict) -> dict:
    """{source: perplexity of the policy on its test answers} (None where not finite)."""
    from pipeline.align.perplexity import response_perplexity
    from pipeline.align.policy import load_policy
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


def rm_reward(ctx: AlignContext, rm_dir: Path):
    """The RM in `rm_dir` as a reward function (calibrated when the section asks), on the stage's device; an
    implicit RM (a DPO policy: its directory holds implicit.json) by its implicit reward."""
    from pipeline.align.rewards import ImplicitReward, RMReward
    from pipeline.reward.index import implicit_spec

    common = dict(
        max_length=ctx.cfg.rm_max_length,
        batch_size=ctx.cfg.rm_batch_size,
        temperature="auto" if ctx.cfg.use_calibrated_rewards else 1.0,
        device=ctx.device,
        name=rm_dir.name,
        conversations=ctx.conversations,
    )
    if (rm_dir / "implicit.json").is_file():
        return ImplicitReward(implicit_spec(ctx.run_dir, rm_dir.name, {"path": str(rm_dir)}), rm_dir, **common)
    return RMReward(str(rm_dir), **common)
