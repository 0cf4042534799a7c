"""Pure helpers of the benchmark scripts (scripts/*.py), which are not importable as a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
