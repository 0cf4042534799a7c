"""Worst-case time of MORE's exact min-norm solve (pipeline.reward.more.min_norm_weights) at K sources.

Worst case of the old 2^K enumeration (2.5 s at K=16): normalize='none', K-1 random gradients with a common
positive direction (the hull stays away from the origin) and one source's gradient strictly inside the
others' cone, at a smaller norm: the optimum is that gradient alone, the last support an enumeration from
the largest supports down reaches. Every solve
is checked against the KKT certificate. The last line printed is JSON:
{"benchmark": "min_norm_solve", "ms": {"8": ..., "16": ..., "64": ..., "256": ...}, "targets_met": ...}
where "ms" is, per K, the slower of two cases (the one above and `full_support`, nearly orthogonal
gradients whose optimum uses every source: the most work for an active-set solver) (median ms per solve
including the Gram matmul; targets on the project's 2-core CPU: <= 1 ms at K=16,
<= 10 ms at K=64).

    python scripts/bench_minnorm.py
    python scripts/bench_minnorm.py --ks 8 16 32 64 128 256 --dim 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.reward.more import min_norm_weights  # noqa: E402


TARGETS_MS = {16: 1.0, 64: 10.0}


def worst_case_grads(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    """K x dim gradients: K-1 in a common half-space, source 0 a positive combination of them (inside their
    cone) scaled down, so the minimum-norm point is source 0's gradient (a single-vertex support)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, dim)) + 0.5
    if k > 1:
        w = rng.dirichlet(np.ones(k - 1))
        g[0] = 0.5 * (w @ g[1:])
    return torch.tensor(g, dtype=torch.float32)


def full_support_grads(k: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Hardest case for an active-set solver: K nearly orthogonal gradients (dim >= K) of varied norms, so the
    optimum uses every source and the solver adds them one by one."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, max(dim, k))) * rng.uniform(0.5, 2.0, size=(k, 1))
    return torch.tensor(g, dtype=torch.float32)


CASES = {"inside_cone": worst_case_grads, "full_support": full_support_grads}


def certificate_ok(grads: torch.Tensor, lam: torch.Tensor, tol: float = 1e-8) -> bool:
    g = grads.double() @ grads.double().T
    g = g / g.diag().abs().max()
    lam = lam.double()
    return bool((g @ lam).min() >= lam @ g @ lam - tol) and bool(lam.min() >= 0) and abs(float(lam.sum()) - 1) < 1e-6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--dim", type=int, default=512, help="gradient dimension (the RM's hidden size)")
    p.add_argument("--repeats", type=int, default=20, help="instances per K (different seeds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out, support, worst = {}, {}, {}
    for k, case in [(k, c) for k in args.ks for c in CASES]:
        times, sizes = [], []
        for seed in range(args.repeats):
            grads = CASES[case](k, args.dim, seed)
            min_norm_weights(grads)  # warm caches
            t0 = time.perf_counter()
            lam = min_norm_weights(grads)
            times.append(time.perf_counter() - t0)
            if not certificate_ok(grads, lam):
                raise SystemExit(f"K={k} seed={seed}: the solution fails the KKT certificate")
            sizes.append(int((lam > 0).sum()))
        key = f"{case}/{k}"
        out[key] = statistics.median(times) * 1e3
        support[key] = statistics.median(sizes)
        worst[str(k)] = max(worst.get(str(k), 0.0), out[key])
        print(f"{case:12s} K={k:4d}: median {out[key]:.3f} ms, max {max(times) * 1e3:.3f} ms, support {support[key]}")
    met = {str(k): worst[str(k)] <= t for k, t in TARGETS_MS.items() if str(k) in worst}
    print(
        json.dumps(
            {
                "benchmark": "min_norm_solve",
                "ms": worst,
                "ms_by_case": out,
                "support_size": support,
                "dim": args.dim,
                "targets_ms": {str(k): t for k, t in TARGETS_MS.items()},
                "targets_met": met,
                "load_average_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
