"""The alignment stage end to end on CPU: tiny RMs in DIR/reward, synthetic data, gold judge, rerun skip."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.align.config import AlignConfig, JudgeConfig
from pipeline.align.judge import JudgeBudgetExhausted
from pipeline.align.judging import render_table
from pipeline.align.prompts import distinct_prompts, select_rms
from pipeline.calibration.compare import parse_comparison
from tests.helpers import reward_model, rm_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # every test here runs on one torch thread


def test_config_validation_and_helpers():
    with pytest.raises(ValueError, match="align.methods"):
        AlignConfig(methods=["dpo"])
    with pytest.raises(ValueError, match="peft"):
        AlignConfig(peft="ia3")
    with pytest.raises(ValueError, match="'<a> vs <b>'"):
        AlignConfig(comparisons=["more versus base"])
    with pytest.raises(ValueError, match="judge.kind"):
        JudgeConfig(kind="human")
    assert AlignConfig(judge={"kind": "openai"}).judge.kind == "openai"
    paper = AlignConfig()
    assert (paper.n, paper.temperature, paper.top_p, paper.sft_batch_size, paper.sft_learning_rate) == (
        4,
        1.2,
        1.0,
        64,
        1e-6,
    )
    assert parse_comparison("more vs base") == ("more", "base")
    index = {"more": {}, "multitask": {}, "single-helpful": {}}
    assert select_rms(index, None) == ["more", "multitask"]
    assert select_rms(index, ["single-helpful"]) == ["single-helpful"]
    with pytest.raises(ValueError, match="not in DIR/reward/index.json"):
        select_rms(index, ["uniform"])
    assert distinct_prompts(["a", "b", "a", "c"], None, 0) == ["a", "b", "c"]
    picked = distinct_prompts([str(i) for i in range(50)], 5, 1)
    assert (
        len(picked) == 5
        and picked == sorted(picked, key=int)
        and picked == distinct_prompts([str(i) for i in range(50)], 5, 1)
    )


def _recipe(**align):
    from pipeline.data import DataConfig, SyntheticConfig

    data = DataConfig(
        sources=[{"name": "helpful", "format": "synthetic"}, {"name": "harmless", "format": "synthetic"}],
        synthetic=SyntheticConfig(sources=("helpful", "harmless"), n_train=40, n_valid=4, n_test=16),
    )
    cfg = dict(
        methods=["best_of_n", "rjs"],
        n=2,
        max_new_tokens=10,
        n_prompts=16,
        n_eval_prompts=6,
        n_ppl=6,
        warm_start_steps=30,
        warm_start_prompts=24,
        warm_start_batch_size=16,
        sft_batch_size=8,
        sft_micro_batch_size=8,
        sft_learning_rate=1e-3,
        sft_max_length=96,
        max_prompt_length=64,
        generation_batch_size=32,
        progress=False,
    )
    cfg.update(align)
    return SimpleNamespace(name="t", seed=0, data=data, align=AlignConfig(**cfg))


def _run_align(recipe, run_dir):
    """The policy stage, then the align stage, which starts from the policy stage's DIR/policy/."""
    from pipeline.align import stage
    from pipeline.policy import stage as policy_stage

    policy_stage.run(recipe, run_dir)
    return stage.run(recipe, run_dir)


def _reward_dir(run_dir):
    index = {}
    tok = rm_tokenizer()
    for i, name in enumerate(["more", "multitask", "single-helpful"]):
        d = run_dir / "reward" / name
        reward_model(seed=i, tok=tok).save_pretrained(d)
        tok.save_pretrained(d)
        index[name] = {
            "path": str(d),
            "method": "single" if name.startswith("single") else name,
            "sources": ["helpful"],
        }
    (run_dir / "reward" / "more" / "temperature.json").write_text(json.dumps({"temperature": 2.0}))
    (run_dir / "reward" / "index.json").write_text(json.dumps(index))


def test_stage_end_to_end_and_rerun_skips(tmp_path, capsys):

    _reward_dir(tmp_path)
    recipe = _recipe()
    artifacts = _run_align(recipe, tmp_path)
    align = tmp_path / "align"
    for a in artifacts:
        assert (tmp_path / a).exists(), a
    # single-source RMs are not aligned by default
    assert sorted(p.name for p in align.iterdir() if not p.name.startswith(".")) == [
        "base",
        "judge_details.jsonl",
        "judgements.json",
        "metrics.json",
        "more",
        "multitask",
        "table.md",
    ]
    assert not (align / ".work").exists()

    bon = [json.loads(line) for line in (align / "more" / "best_of_n" / "samples.jsonl").read_text().splitlines()]
    assert len(bon) == 16 and all(len(r["candidates"]) == 2 and len(r["scores"]) == 2 for r in bon)
    assert all(r["scores"][r["chosen"]] == max(r["scores"]) for r in bon)
    rjs_dir = align / "more" / "rjs"
    assert (rjs_dir / "policy" / "model.safetensors").exists() and (rjs_dir / "train_log.json").exists()
    assert (rjs_dir / "samples.jsonl").exists()
    evals = [json.loads(line) for line in (rjs_dir / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 12 and {e["set"] for e in evals} == {"helpful", "harmless"}
    # the same candidates, picked by RMs with and without a temperature: scores scale by 1/T
    more = json.loads((align / "more" / "best_of_n" / "samples.jsonl").read_text().splitlines()[0])
    assert (
        more["candidates"]
        == json.loads((align / "multitask" / "best_of_n" / "samples.jsonl").read_text().splitlines()[0])["candidates"]
    )

    judgements = json.loads((align / "judgements.json").read_text())
    assert set(judgements) == {
        f"{m}: {c}" for m in ("best_of_n", "rjs") for c in ("more vs multitask", "more vs base", "multitask vs base")
    }
    for per_set in judgements.values():
        assert set(per_set) == {"helpful", "harmless", "all"}
        for r in per_set.values():
            assert r["n"] + r["counts"]["invalid"] == (12 if r is per_set["all"] else 6)
            assert abs(r["win"] + r["tie"] + r["lose"] - 1) < 1e-9
            assert set(r["interval"]) == {"win", "tie", "lose"}
    details = [json.loads(line) for line in (align / "judge_details.jsonl").read_text().splitlines()]
    from pipeline.data.synthetic import gold_reward

    d = details[0]
    assert d["gold_a"] == gold_reward(d["prompt"], d["response_a"])  # the gold judge really is r*
    metrics = json.loads((align / "metrics.json").read_text())["policies"]
    assert set(metrics) == {"base", "more/best_of_n", "more/rjs", "multitask/best_of_n", "multitask/rjs"}
    assert set(metrics["more/rjs"]["perplexity"]) == {"helpful", "harmless"}
    assert metrics["more/rjs"]["perplexity"] != metrics["base"]["perplexity"]  # trained policy, other PPL
    assert metrics["more/best_of_n"]["perplexity"] == metrics["base"]["perplexity"]
    table = (align / "table.md").read_text()
    assert "rjs: more vs multitask" in table and "PPL helpful" in table

    # rerun: every sub-result is skipped, nothing is rewritten
    stamp = os.stat(rjs_dir / "policy" / "model.safetensors").st_mtime_ns
    capsys.readouterr()
    _run_align(recipe, tmp_path)
    out = capsys.readouterr().out
    assert out.count("done earlier, skipping") == 4
    assert os.stat(rjs_dir / "policy" / "model.safetensors").st_mtime_ns == stamp
    assert json.loads((align / "judgements.json").read_text()) == judgements

    # a changed setting redoes what depends on it
    _run_align(_recipe(sft_learning_rate=2e-3, methods=["rjs"], rms=["more"], comparisons=["more vs base"]), tmp_path)
    assert os.stat(rjs_dir / "policy" / "model.safetensors").st_mtime_ns != stamp
    assert set(json.loads((align / "judgements.json").read_text())) == {"rjs: more vs base"}

    # a changed warm start rebuilds the base policy and re-samples its candidates
    base_stamp = os.stat(tmp_path / "policy" / "model.safetensors").st_mtime_ns
    cands = (align / "base" / "eval_candidates.jsonl").read_text()
    steps = recipe.align.warm_start_steps + 1
    _run_align(
        _recipe(warm_start_steps=steps, methods=["best_of_n"], rms=["more"], comparisons=["more vs base"]), tmp_path
    )
    assert os.stat(tmp_path / "policy" / "model.safetensors").st_mtime_ns != base_stamp
    assert (align / "base" / "eval_candidates.jsonl").read_text() != cands


def test_stage_errors(tmp_path):

    with pytest.raises(FileNotFoundError, match="run the reward stage first"):
        _run_align(_recipe(), tmp_path)
    _reward_dir(tmp_path)
    with pytest.raises(ValueError, match="eval_sources"):
        _run_align(_recipe(eval_sources=["webgpt"]), tmp_path)


def test_render_table_handles_empty():
    assert "(no comparison judged)" in render_table(
        {}, {"base": {"perplexity": {"helpful": 3.0}, "gold": None}}, "gold"
    )


def test_stage_runs_ppo_and_rloo(tmp_path):
    """The RL methods through the stage: this project's PPO and TRL's RLOO, RM as reward, gold logged."""

    _reward_dir(tmp_path)
    recipe = _recipe(
        methods=["ppo", "rloo"],
        rms=["more"],
        comparisons=["more vs base"],
        ppo={"num_steps": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "progress": False},
        rloo={"max_steps": 2, "per_device_train_batch_size": 4},
    )
    _run_align(recipe, tmp_path)
    align = tmp_path / "align"
    summary = json.loads((align / "more" / "ppo" / "ppo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["first_gold_mean"] is not None  # gold reward measured per step
    assert (align / "more" / "ppo" / "policy" / "config.json").exists()
    scale = json.loads((align / "more" / "ppo" / "reward_scale.json").read_text())
    assert scale["rm"] == "more" and scale["kl_coef"] == 0.05  # the PPO reward's scale, recorded
    assert json.loads((align / "metrics.json").read_text())["policies"]["more/ppo"]["reward_scale"] == scale
    assert "**PPO reward scale.**" in (align / "table.md").read_text()
    rloo_log = json.loads((align / "more" / "rloo" / "train_log.json").read_text())
    assert sum("rewards/gold/mean" in r for r in rloo_log) == 2
    assert (align / "more" / "rloo" / "policy" / "model.safetensors").exists()
    judgements = json.loads((align / "judgements.json").read_text())
    assert set(judgements) == {"ppo: more vs base", "rloo: more vs base"}
    assert not (align / ".work").exists()


def test_stage_with_an_openai_compatible_judge(tmp_path, monkeypatch, capsys):
    """The LLM judge through the stage, against a loopback server: both orders asked, cached across reruns,
    helpful/harmless prompts per prompt set, and the API key nowhere in the outputs."""
    from tests.helpers import judge_server

    secret = "sk-align-stage-SECRET-987"
    monkeypatch.setenv("ALIGN_TEST_KEY", secret)
    _reward_dir(tmp_path)
    with judge_server() as server:
        server.echo_auth = True  # every reply repeats the Authorization header (issue 12)
        recipe = _recipe(
            methods=["best_of_n"],
            rms=["more"],
            comparisons=["more vs base"],
            judge={
                "kind": "openai",
                "base_url": server.base_url,
                "model": "judge-x",
                "api_key_env": "ALIGN_TEST_KEY",
                "backoff_s": 0.01,
            },
        )
        _run_align(recipe, tmp_path)
        assert server.requests == 2 * 12  # 12 held-out prompts, each asked in both orders
        harmless = [b for b in server.bodies if "more harmless" in b["messages"][0]["content"]]
        assert len(harmless) == 12  # the harmless prompt set gets the harmlessness question
        judgements = json.loads((tmp_path / "align" / "judgements.json").read_text())
        per_set = judgements["best_of_n: more vs base"]
        # this server always answers "A" when no response is GOOD: the two orders disagree, so all ties
        assert per_set["all"]["counts"] == {"win": 0, "tie": 12, "lose": 0, "invalid": 0}
        _run_align(recipe, tmp_path)
        assert server.requests == 2 * 12  # the rerun pays nothing
        assert "judge: 12 comparisons x 2 orders; 0 requests to send (24 answers cached)" in capsys.readouterr().out
        # another judge model (nothing cached) with a budget below 24 requests + the 10% retry allowance: refused
        # before its first request (it used to spend the whole budget and then fail)
        recipe.align.judge.model, recipe.align.judge.max_requests = "judge-y", 26
        with pytest.raises(JudgeBudgetExhausted) as err:
            _run_align(recipe, tmp_path)
        assert server.requests == 2 * 12
        assert "max_requests=26 cannot cover" in str(err.value) and "need 24 requests (0 answers cached)" in str(
            err.value
        )
        assert "10% retry allowance = 27; nothing was sent. Fix: align.judge.max_requests=27" in str(err.value)
        recipe.align.judge.max_requests = 27
        _run_align(recipe, tmp_path)
        assert server.requests == 2 * 12 + 24
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert "Bearer ***" in (tmp_path / "align" / "judge_details.jsonl").read_text()  # the echo, redacted
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_run_directory_stamped_by_the_old_fingerprint_reruns_its_align_work(tmp_path, monkeypatch, capsys):
    """Align's stamps were once sha256(json.dumps(obj, sort_keys=True, default=str))[:16]; they are now
    `pipeline.io.sha256_json(obj)[:16]`. A run directory stamped the old way (here: made with the old hash in
    place of the new one) redoes its align work once, saying why: no reuse under a stamp that no longer
    describes it, no crash; after that the work is reused again."""
    import hashlib
    import sys

    from pipeline.io import sha256_json

    def old_hash(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    _reward_dir(tmp_path)
    recipe = _recipe(methods=["best_of_n"], rms=["more"], comparisons=["more vs base"])
    with monkeypatch.context() as m:
        patched = [
            name
            for name, mod in list(sys.modules.items())
            if name.startswith(("pipeline.align.", "pipeline.policy."))
            and getattr(mod, "sha256_json", None) is sha256_json
        ]
        assert "pipeline.align.stage" in patched and "pipeline.policy.stage" in patched
        for name in patched:
            m.setattr(sys.modules[name], "sha256_json", old_hash)
        _run_align(recipe, tmp_path)
    align = tmp_path / "align"
    old = {p: (tmp_path / p).read_text() for p in ("policy/policy.json", "align/more/best_of_n/settings.json")}
    capsys.readouterr()

    _run_align(recipe, tmp_path)
    out = capsys.readouterr().out
    reason = "its settings changed since it was made (or an older version of the pipeline made it)"
    assert (
        f"[policy] building the tiny base policy (warm start on synthetic responses of mixed quality): {reason}" in out
    )
    assert f"from the base policy: {reason}" in out  # the candidates are sampled again
    assert f"[align] more/best_of_n: aligning: {reason}" in out
    assert "done earlier" not in out
    assert all((tmp_path / p).read_text() != text for p, text in old.items())
    assert json.loads((align / "judgements.json").read_text())["best_of_n: more vs base"]["all"]["n"] == 12

    _run_align(recipe, tmp_path)  # stamped by this version: reused
    out = capsys.readouterr().out
    assert "[align] more/best_of_n: done earlier, skipping" in out and "building" not in out and "sampling" not in out


def test_dry_run_shows_the_judge_requests_and_refuses_a_budget_that_cannot_cover_them(tmp_path, capsys, caplog):
    """tiny-cpu with an OpenAI-compatible judge: --dry-run says how many requests its judging needs (1200
    comparisons x 2 orders + 10% for retries = 2640), the default budget covers it, a smaller one is refused
    before any work (one line naming the numbers and the fix), and answers cached in the run directory count
    as free (a rerun after an exhausted budget resumes)."""
    from pipeline import run as R

    caplog.set_level("INFO")
    base = ["--recipe", "tiny-cpu", "--output-dir", str(tmp_path), "--dry-run", "align.judge.kind=openai"]
    base += ["align.judge.api_key_env=''"]
    assert R.main(base) == 0
    line = (
        "judge: up to 1200 comparisons (2 method(s) x 3 comparison(s) x 2 prompt set(s) x up to 100 held-out "
        "prompts) x 2 orders = 2400 requests, minus 0 cached answers, plus a 10% retry allowance = 2640 of "
        "align.judge.max_requests=6000"
    )
    assert line in caplog.text
    assert R.main([*base, "align.judge.max_requests=2000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "align.judge.max_requests=2000 in " in err
    assert "= 2640 of align.judge.max_requests=2000. Fix: align.judge.max_requests=2640 (or more)" in err
    cache = tmp_path / "align" / "judge_cache.jsonl"
    cache.parent.mkdir()
    rec = {"model": "gpt-4", "order": "ab", "reply": "A", "verdict": "A"}
    cache.write_text("".join(json.dumps({**rec, "key": f"k{i}"}) + "\n" for i in range(1000)))
    caplog.clear()
    assert R.main([*base, "align.judge.max_requests=2000"]) == 0
    assert "2400 requests, minus 1000 cached answers, plus a 10% retry allowance = 1540" in caplog.text


def test_best_of_n_at_several_sizes_rjs_at_its_own_n_and_comparisons_between_methods(tmp_path):
    """Issue 31 / 30: best-of-N at nested N from one draw (align.best_of_n_sizes), RJS on the best of the first
    align.rjs_n candidates, and policies of different methods judged against each other with the paired
    gold-reward difference, each checked against a brute-force recomputation from the written records."""
    from scipy.stats import ttest_rel

    from pipeline.data.synthetic import gold_reward
    from pipeline.sweep.aggregation import collect_run

    _reward_dir(tmp_path)
    comparisons = ["more vs multitask", "more/rjs vs more/best_of_n", "base vs multitask/rjs"]
    recipe = _recipe(n=4, best_of_n_sizes=[1, 2, 4], rjs_n=2, rms=["more", "multitask"], comparisons=comparisons)
    _run_align(recipe, tmp_path)
    align = tmp_path / "align"

    rjs = [json.loads(x) for x in (align / "more" / "rjs" / "samples.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (align / "base" / "train_candidates.jsonl").read_text().splitlines()]
    assert all(len(r["candidates"]) == 2 == len(r["ended"]) for r in rjs)  # RJS saw the first rjs_n only
    assert [r["candidates"] for r in rjs] == [b["candidates"][:2] for b in base]

    metrics = json.loads((align / "metrics.json").read_text())["policies"]
    for rm in ("more", "multitask"):
        evals = [json.loads(x) for x in (align / rm / "best_of_n" / "eval.jsonl").read_text().splitlines()]
        cands = [json.loads(x) for x in (align / "base" / "eval_candidates.jsonl").read_text().splitlines()]
        for k in (1, 2, 4):
            picks = [c["candidates"][max(range(k), key=lambda i: (e["scores"][i], -i))] for e, c in zip(evals, cands)]
            assert [e["responses_at"][str(k)] for e in evals] == picks
            gold = [gold_reward(e["prompt"], p) for e, p in zip(evals, picks)]
            assert metrics[f"{rm}/best_of_n"]["gold_at"][str(k)]["mean"] == pytest.approx(np.mean(gold), abs=1e-12)
        assert [e["responses_at"]["4"] for e in evals] == [e["response"] for e in evals]  # N = n: the usual pick
    assert "gold_at" not in metrics["more/rjs"]

    judgements = json.loads((align / "judgements.json").read_text())
    assert set(judgements) == {
        "best_of_n: more vs multitask",
        "rjs: more vs multitask",
        "more/rjs vs more/best_of_n",
        "base vs multitask/rjs",
    }
    details = [json.loads(x) for x in (align / "judge_details.jsonl").read_text().splitlines()]
    for key in judgements:
        rows = [d for d in details if d["comparison"] == key]
        a = [gold_reward(d["prompt"], d["response_a"]) for d in rows]
        b = [gold_reward(d["prompt"], d["response_b"]) for d in rows]
        diff = judgements[key]["all"]["gold_difference"]
        assert diff["mean"] == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12) and diff["n"] == len(rows) == 12
        if np.ptp(np.subtract(a, b)) > 0:
            assert diff["p_value"] == pytest.approx(ttest_rel(a, b).pvalue, rel=1e-9)
    rjs_eval = [json.loads(x) for x in (align / "more" / "rjs" / "eval.jsonl").read_text().splitlines()]
    cross = [d for d in details if d["comparison"] == "more/rjs vs more/best_of_n"]
    assert [d["response_a"] for d in cross] == [e["response"] for e in rjs_eval]
    table = (align / "table.md").read_text()
    assert "| more/rjs vs more/best_of_n | all |" in table and "gold a - b [95% CI], p" in table

    rows = {(s, n, scope, m): v for s, n, scope, m, v in collect_run(tmp_path)}
    for k in (1, 2, 4):
        assert (
            rows[("align", f"more/best_of_n@{k}", "all", "gold_reward")]
            == metrics["more/best_of_n"]["gold_at"][str(k)]["mean"]
        )
    assert rows[("judge", "more/rjs vs more/best_of_n", "all", "gold_diff")] == pytest.approx(
        judgements["more/rjs vs more/best_of_n"]["all"]["gold_difference"]["mean"]
    )


def test_comparisons_of_named_policies_are_checked_before_any_work():
    from pipeline.align.config import comparison_policies

    assert comparison_policies("more vs multitask") == ("more", "multitask", False)
    assert comparison_policies("dpo/policy vs more/best_of_n") == ("dpo/policy", "more/best_of_n", True)
    assert comparison_policies("base vs more/rjs") == ("base", "more/rjs", True)
    with pytest.raises(ValueError, match="mixes a policy with the RM name 'multitask'"):
        comparison_policies("more/rjs vs multitask")
    with pytest.raises(ValueError, match=r"'more/sft' is not a policy '<rm>/<method>'"):
        AlignConfig(comparisons=["more/sft vs base"])
    recipe = _recipe(comparisons=["more/ppo vs more/rjs"])
    recipe.reward = SimpleNamespace(methods=["more", "multitask"])
    from pipeline.align.stage import _check_rms_and_comparisons
    from pipeline.errors import RecipeError

    with pytest.raises(RecipeError, match=r"names \['more/ppo'\], whose method is not in align.methods"):
        _check_rms_and_comparisons(["more", "multitask"], ["helpful"], recipe.align, lambda s: True, lambda k: k)
    with pytest.raises(RecipeError, match=r"names \['dpo/policy'\], not an RM aligned"):
        _check_rms_and_comparisons(
            ["more"], ["helpful"], _recipe(comparisons=["dpo/policy vs more/rjs"]).align, lambda s: True, lambda k: k
        )
