"""The prepared GPU check runs end to end on CPU with its tiny shapes (bench_train vs stock TRL, bench_generate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_prints_one_json_line_per_benchmark():
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--tiny"], capture_output=True, text=True,
                         env=env, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert [x["benchmark"] for x in lines] == ["rm_train_throughput", "bon_generation"]
    train = lines[0]
    for key in ("speedup_vs_trl", "more_overhead", "params_m", "tokens_per_pair", "load_average_1m", "baseline"):
        assert key in train
    assert train["pairs_per_s"]["trl"] > 0 and train["data"] == "synthetic-profile"
    # the synthetic fallback keeps the shared-prompt profile of the real data
    assert 0.4 < train["shared_prompt_token_fraction"] < 0.8
