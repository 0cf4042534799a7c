"""The benchmark scripts (scripts/*.py, not importable as a package): the shared timing discipline
(scripts/bench_common.py) against hand-computed timings, the identical-work evidence, and the prepared GPU
check end to end on CPU with its tiny shapes (bench_train vs stock TRL, bench_generate)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_generate_loop_prompts_are_a_uniform_sample():
    """--loop-prompts K must time the loop on K prompts drawn uniformly, not on the first (longest) prompts
    of each length-sorted batch, and scale its time by N/K."""
    plan_rounds = _script("bench_generate").plan_rounds
    rng = np.random.default_rng(0)
    prompts = [list(range(int(n))) for n in rng.integers(20, 201, size=64)]
    mean_len = np.mean([len(p) for p in prompts])
    drawn = []
    for seed in range(200):
        rounds, scale = plan_rounds(prompts, 16, 8, seed)
        assert scale == 64 / 8
        assert [p for batch, _ in rounds for p in batch] == sorted(prompts, key=len, reverse=True)  # ours: all, sorted
        sub = [p for _, s in rounds for p in s]
        assert len(sub) == 8 and all(any(p is q for q in batch) for batch, s in rounds for p in s)
        drawn += [len(p) for p in sub]
    # uniform: the drawn lengths average the prompts' mean length (1600 draws: se ~ 1.3 tokens)
    assert abs(np.mean(drawn) - mean_len) < 5, (np.mean(drawn), mean_len)
    rounds, scale = plan_rounds(prompts, 16, None, 0)  # no --loop-prompts: every prompt, no scaling
    assert scale == 1 and all(batch == sub for batch, sub in rounds)


# --------------------------------------------------------------------------------------------------
# scripts/bench_common.py: the one timing discipline
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def common():
    return _script("bench_common")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_run_interleaved_times_the_same_steps_rotates_and_excludes_warmup_alike(common, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    calls = []
    cost = {"a": 2.0, "b": 1.0, "c": 4.0}

    def side(name, warm=False):
        def f(i):
            calls.append((name, i, warm))
            clock.now += cost[name] * (1 + i)  # step i of every side costs the same multiple of its unit
            return 10 * i

        return f

    t = common.run_interleaved(
        {n: side(n) for n in "abc"},
        4,
        repeats=3,
        warmup_steps=2,
        warmup={n: side(n, warm=True) for n in "abc"},
    )
    warm = [c for c in calls if c[2]]
    timed = [c for c in calls if not c[2]]
    assert calls[: len(warm)] == warm  # the warm-up comes first ...
    assert sorted((n, i) for n, i, _ in warm) == [(n, i) for n in "abc" for i in range(2)]  # ... alike, untimed
    # every side ran the very same steps in every repeat
    for n in "abc":
        assert [i for m, i, _ in timed if m == n] == list(range(4)) * 3
        assert t.seconds[n] == [[cost[n] * (1 + i) for i in range(4)] for _ in range(3)]
        assert t.out[n] == [[0, 10, 20, 30]] * 3
    # interleaved step by step, and who goes first rotates with the step and the repeat
    assert [c[0] for c in timed[:3]] == ["a", "b", "c"] and [c[0] for c in timed[3:6]] == ["b", "c", "a"]
    assert t.orders[4] == ["b", "c", "a"]  # repeat 1, step 0
    assert {o[0] for o in t.orders} == set("abc")
    s = common.ratio_summary(t, "a", "b")
    assert s == {"median": 2.0, "min": 2.0, "max": 2.0, "per_repeat": [2.0, 2.0, 2.0]}
    assert common.seconds_per_side(t) == {"a": 20.0, "b": 10.0, "c": 40.0}


def test_ratio_summary_median_and_spread_over_repeats(common):
    t = common.Timings(["trl", "ours"])
    t.seconds = {"trl": [[3.0, 3.0], [4.0, 5.0], [10.0, 2.0]], "ours": [[2.0, 1.0], [3.0, 3.0], [2.0, 2.0]]}
    # per repeat: 6/3 = 2, 9/6 = 1.5, 12/4 = 3 -> median 2, min 1.5, max 3
    s = common.ratio_summary(t, "trl", "ours")
    assert (s["median"], s["min"], s["max"], s["per_repeat"]) == (2.0, 1.5, 3.0, [2.0, 1.5, 3.0])
    flat = common.flat_ratio_fields("speedup_vs_trl", s)
    assert flat["speedup_vs_trl"] == 2.0 and flat["speedup_vs_trl_min"] == 1.5 and flat["speedup_vs_trl_max"] == 3.0
    d = common.discipline(t)
    # 2 steps and a shortest side-repeat of 3 s: below the bar of 20 steps or 60 s
    assert d == {"repeats": 3, "timed_steps": 2, "shortest_side_repeat_s": 3.0, "meets_discipline": False}
    t.seconds = {k: [[30.0, 31.0]] * 3 for k in t.seconds}
    assert common.discipline(t)["meets_discipline"]  # 61 s per side per repeat
    t.seconds = {k: [[30.0, 31.0]] * 2 for k in t.seconds}
    assert not common.discipline(t)["meets_discipline"]  # only 2 repeats
    t.seconds = {k: [[0.1] * 20] * 3 for k in t.seconds}
    assert common.discipline(t)["meets_discipline"]  # 20 steps


def test_same_multiset_is_the_identical_work_check(common):
    assert common.same_multiset([[0, 1], [2, 3]], [[3, 1], [0, 2]], [[0, 1, 2, 3]])
    assert not common.same_multiset([[0, 1], [2, 3]], [[0, 1], [2, 4]])  # a different pair
    assert not common.same_multiset([[0, 1], [2, 3]], [[0, 1], [2, 3, 3]])  # one pair twice


def test_precision_follows_the_cpu_bf16_flags(common):
    with_bf16 = "model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    without = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert common.cpu_model(without) == "AMD EPYC"
    assert common.cpu_bf16_flags(with_bf16) == ["avx512_bf16"] and common.cpu_bf16_flags(without) == []
    assert common.choose_precision("auto", "cpu", with_bf16)[0] == "bf16"
    prec, why = common.choose_precision("auto", "cpu", without)
    assert prec == "fp32" and "avx512_bf16" in why
    assert common.choose_precision("auto", "cuda", without)[0] == "bf16"
    assert common.choose_precision("fp32", "cuda", with_bf16) == ("fp32", "--precision fp32")
    with pytest.raises(ValueError, match="--precision"):
        common.choose_precision("fp16", "cpu", without)


def test_count_tokens_counts_what_each_forward_was_fed(common):
    import torch

    model = torch.nn.Embedding(10, 2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = model

        def forward(self, input_ids=None, attention_mask=None):
            return self.emb(input_ids)

    m = Wrap()
    with common.count_tokens(m) as counter:
        m(input_ids=torch.zeros(3, 7, dtype=torch.long))
        m(torch.zeros(2, 5, dtype=torch.long))
        assert counter.take() == 3 * 7 + 2 * 5 and counter.take() == 0
    m(input_ids=torch.zeros(1, 4, dtype=torch.long))  # the hook is gone
    assert counter.tokens == 0


def test_report_table_and_readme_block(common, tmp_path):
    line = {
        "benchmark": "rm_train_throughput",
        "speedup_vs_trl": 1.8,
        "speedup_vs_trl_min": 1.6,
        "speedup_vs_trl_max": 2.1,
        "more_overhead": 1.0,
        "more_overhead_min": 0.98,
        "more_overhead_max": 1.02,
        "timed_pairs_identical": True,
        "timed_pair_tokens_trl": 1000,
        "timed_pair_tokens_ours": 1000,
        "input_tokens_trl": 2500,
        "input_tokens_ours": 900,
        "repeats": 3,
        "timed_steps": 20,
        "meets_discipline": True,
        "precision": "fp32",
        "threads": 2,
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [2.0, 2.0, 2.0],
    }
    lines = tmp_path / "lines.tsv"
    lines.write_text("python scripts/bench_train.py\t" + json.dumps(line) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{common.README_BEGIN}\nold table 9.99x\n{common.README_END}\noutro\n")
    report = common.write_report(
        str(lines), str(tmp_path / "b.json"), str(tmp_path / "b.md"), str(readme), "bash x.sh", [0.5, 0.5, 0.5]
    )
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["result"] == line
    text = readme.read_text()
    assert "9.99x" not in text and text.startswith("intro\n") and text.endswith(f"{common.README_END}\noutro\n")
    assert "**1.8** [1.6-2.1]" in text and "pair tokens TRL 1,000 / ours 1,000" in text
    assert "input tokens TRL 2,500 / ours 900" in text and report["cpu_model"] in text
    assert (tmp_path / "b.md").read_text().count("**1.8** [1.6-2.1]") == 1
    with pytest.raises(ValueError, match="benchmarks:end"):
        common.replace_block("no markers here", "table")


def test_bench_train_pools_are_balanced_and_disjoint():
    split = _script("bench_train").balanced_split
    rows = [{"source_id": k, "i": i} for k in range(4) for i in range(10)]
    warm, timed = split(rows, 4, per_source=2, warm_steps=2)
    assert len(warm) == 16 and len(timed) == 24
    assert not {id(r) for r in warm} & {id(r) for r in timed}
    assert all(sum(r["source_id"] == k for r in timed) == 6 for k in range(4))
    # warm-up batch b holds per_source pairs of every source
    assert [r["source_id"] for r in warm[:8]] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_bench_scoring_times_the_same_pairs_on_every_side():
    r = _script("bench_scoring").main(
        ["--size", "tiny", "--pairs", "8", "--round-pairs", "4", "--repeats", "3", "--synthetic"]
        + ["--vocab-size", "500", "--precision", "fp32", "--threads", "1"]
    )
    assert r["timed_pairs_identical"] and r["repeats"] == 3 and r["timed_steps"] == 2
    assert len(set(r["timed_pair_tokens"].values())) == 1  # the same pairs on every side
    assert r["input_tokens"]["naive"] == 8 * 2 * 512  # padded to 512
    assert r["input_tokens"]["ours"] <= r["input_tokens"]["dynamic"] < r["input_tokens"]["naive"]
    assert r["ratio_vs_dynamic_padding_min"] <= r["ratio_vs_dynamic_padding"] <= r["ratio_vs_dynamic_padding_max"]
    assert r["max_abs_reward_diff_dynamic"] < 1e-4 * max(1.0, r["reward_scale"])  # fp32: the same rewards
    assert r["precision"] == "fp32" and r["threads"] == 1 and len(r["load_before"]) == 3


@pytest.mark.slow
def test_gpu_check_tiny_prints_one_json_line_per_benchmark():
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert [x["benchmark"] for x in lines] == ["rm_train_throughput", "bon_generation"]
    train, gen = lines
    for key in (
        "speedup_vs_trl", "speedup_vs_trl_min", "speedup_vs_trl_max", "repeats", "timed_pairs_identical",
        "timed_pair_tokens_trl", "timed_pair_tokens_ours", "input_tokens_trl", "input_tokens_ours",
        "more_overhead", "precision", "threads", "load_before", "load_after", "params_m", "baseline",
    ):  # fmt: skip
        assert key in train, key
    assert train["repeats"] == 3 and train["timed_pairs_identical"] and train["more_overhead_batches_identical"]
    assert train["timed_pair_tokens_trl"] == train["timed_pair_tokens_ours"]
    # stock TRL pads and repeats the prompt; ours packs it once: fewer tokens fed for the same pairs
    assert train["input_tokens_ours"] < train["input_tokens_trl"]
    assert train["speedup_vs_trl_min"] <= train["speedup_vs_trl"] <= train["speedup_vs_trl_max"]
    assert train["pairs_per_s"]["trl"] > 0 and train["data"] == "synthetic-profile"
    # the synthetic fallback keeps the shared-prompt profile of the real data
    assert 0.4 < train["shared_prompt_token_fraction"] < 0.8
    assert gen["repeats"] == 3 and gen["ratio_min"] <= gen["ratio"] <= gen["ratio_max"]
    # --loop-prompts 2 of 4: the loop timed a sample, and says so
    assert not gen["timed_prompts_identical"] and gen["loop_time_scale"] == 2.0
    assert gen["new_tokens"] == {"ours": 4 * 4 * 2, "loop": 2 * 4 * 2}
