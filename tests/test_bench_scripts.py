"""The benchmark scripts (scripts/*.py, not importable as a package): their pure helpers, and the prepared GPU
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
    train = lines[0]
    for key in ("speedup_vs_trl", "more_overhead", "params_m", "tokens_per_pair", "load_average_1m", "baseline"):
        assert key in train
    assert train["pairs_per_s"]["trl"] > 0 and train["data"] == "synthetic-profile"
    # the synthetic fallback keeps the shared-prompt profile of the real data
    assert 0.4 < train["shared_prompt_token_fraction"] < 0.8
