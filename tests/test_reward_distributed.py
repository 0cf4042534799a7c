"""MORE under 2 real CPU processes: DDP (gloo) and DeepSpeed ZeRO-3. CI runs both."""

import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, torchrun_worker


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_more.py"


def _torchrun(out: Path, *extra: str, timeout: int) -> list[dict]:
    """tests/scripts/ddp_more.py on 2 ranks, rendezvous on 127.0.0.1 at a free port."""
    rendezvous = ("--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    return torchrun_worker(SCRIPT, out, *extra, timeout=timeout, rendezvous=rendezvous)


def _weights(out: Path, rank: int) -> dict:
    import torch

    return torch.load(out / f"rank{rank}_weights.pt", weights_only=True)


_DDP_RUN: dict = {}


def _ddp_run(tmp_path_factory):
    """The DDP run, done once: its own test checks it and the ZeRO-3 test compares against it."""
    if not _DDP_RUN:
        out = tmp_path_factory.mktemp("ddp")
        _DDP_RUN.update(out=out, ranks=_torchrun(out, timeout=400))
    return _DDP_RUN["out"], _DDP_RUN["ranks"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_share_identical_more_weights(tmp_path_factory):
    out, (r0, r1) = _ddp_run(tmp_path_factory)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["batches"] != r1["batches"]  # the ranks really saw different pairs ...
    assert len(r0["lambdas"]) == 4
    assert r0["lambdas"] == r1["lambdas"]  # ... and still solved for exactly the same weights
    assert r0["weight_sum"] == r1["weight_sum"]


@pytest.mark.distributed
@pytest.mark.deepspeed
@pytest.mark.slow
def test_deepspeed_zero3_more_completes(tmp_path, tmp_path_factory):
    """ZeRO-3 (partitioned parameters) trains the same model as DDP: same MORE weights, same final weights.
    torchrun's rc 0 (asserted in torchrun_worker) also covers a clean teardown on both ranks."""
    r0, r1 = _torchrun(tmp_path, "--zero", "3", timeout=600)
    assert r0["world_size"] == 2
    assert len(r0["lambdas"]) == 4 and r0["lambdas"] == r1["lambdas"]
    for lam in r0["lambdas"]:
        assert min(lam) >= 0 and abs(sum(lam) - 1) < 1e-5
    z0, z1 = _weights(tmp_path, 0), _weights(tmp_path, 1)
    for name in z0:
        assert torch_equal(z0[name], z1[name]), name  # every rank gathers the same full weights
    ddp_out, (d0, _) = _ddp_run(tmp_path_factory)
    ddp = _weights(ddp_out, 0)
    assert set(ddp) == set(z0)
    import numpy as np

    assert r0["batches"] == d0["batches"]  # the same data on each rank ...
    np.testing.assert_allclose(r0["lambdas"], d0["lambdas"], atol=1e-4)  # ... gives the same MORE weights
    for name, w in ddp.items():
        np.testing.assert_allclose(z0[name].numpy(), w.numpy(), atol=2e-4, rtol=1e-3, err_msg=name)
    init = _weights_init()
    moved = sum(not torch_equal(init[n], z0[n]) for n in z0)
    assert moved > 0  # and training changed them


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _weights_init() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests import reward_helpers as H

    return {n: p.detach().float() for n, p in H.model("gpt_neox", H.tokenizer()).named_parameters()}
