"""MORE's pure functions against independent references (brute force, autograd, float64)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pipeline.reward.more import (
    head_gradient_sums,
    min_norm_weights,
    min_norm_weights_from_gram,
    more_weights,
    normalize_gradients,
    per_source_head_gradients,
    update_momentum,
)


def _objective(g, lam):
    v = g.T @ lam
    return float(v @ v)


def _reference_min(g, seeds=20):
    """Best of many SLSQP runs from random starts plus every vertex and edge midpoint (float64)."""
    k = g.shape[0]
    best = min(_objective(g, np.eye(k)[i]) for i in range(k))
    for i, j in itertools.combinations(range(k), 2):  # closed-form minimum on each edge
        d = g[i] - g[j]
        t = 0.5 if d @ d == 0 else float(np.clip(-(g[j] @ d) / (d @ d), 0, 1))
        best = min(best, _objective(g, t * np.eye(k)[i] + (1 - t) * np.eye(k)[j]))
    rng = np.random.default_rng(0)
    for _ in range(seeds):
        x0 = rng.dirichlet(np.ones(k))
        r = minimize(
            lambda x: _objective(g, x),
            x0,
            method="SLSQP",
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        if r.success:
            best = min(best, _objective(g, np.clip(r.x, 0, None) / np.clip(r.x, 0, None).sum()))
    return best


@pytest.mark.parametrize("k,d", [(2, 3), (3, 2), (4, 6), (5, 16), (6, 3)])
@pytest.mark.parametrize("seed", range(5))
def test_min_norm_matches_reference_optimum(k, d, seed):
    g = np.random.default_rng(seed).normal(size=(k, d))
    g[0] += 2.0  # push the hull away from the origin sometimes
    lam = min_norm_weights(torch.tensor(g)).numpy()
    assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0, abs=1e-12)
    assert _objective(g, lam) <= _reference_min(g) + 1e-9


def test_min_norm_hand_cases():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    cases = {
        "orthogonal": (np.stack([a, b]), [0.5, 0.5]),
        "duplicated": (np.stack([a, a, b]), [0.25, 0.25, 0.5]),
        "opposing": (np.stack([a, -a]), [0.5, 0.5]),
        "colinear": (np.stack([a, 2 * a]), [1.0, 0.0]),
        "zero_row": (np.stack([a, np.zeros(2), b]), [0.0, 1.0, 0.0]),
        "all_zero": (np.zeros((3, 2)), [1 / 3, 1 / 3, 1 / 3]),
        "single": (np.stack([a]), [1.0]),
        "dominated": (np.stack([a, a + 0.1 * b, b]), [0.5, 0.0, 0.5]),
    }
    for name, (g, want) in cases.items():
        lam = min_norm_weights(torch.tensor(g)).numpy()
        np.testing.assert_allclose(lam, want, atol=1e-9, err_msg=name)


def test_min_norm_equilateral_reaches_origin():
    ang = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    g = np.stack([np.cos(ang), np.sin(ang)], 1)
    lam = min_norm_weights(torch.tensor(g)).numpy()
    np.testing.assert_allclose(lam, [1 / 3] * 3, atol=1e-9)
    assert _objective(g, lam) < 1e-20


def test_min_norm_kkt_and_scale_invariance():
    rng = np.random.default_rng(7)
    for _ in range(50):
        g = rng.normal(size=(5, 4)) * 10 ** rng.uniform(-6, 6)
        lam = min_norm_weights_from_gram(g @ g.T)
        gram = g @ g.T / np.abs(np.diag(g @ g.T)).max()
        val = lam @ gram @ lam
        assert (gram @ lam).min() >= val - 1e-8  # KKT: no vertex direction decreases the norm


def _enumerate_min_norm(gram):
    """Brute force over all 2^K supports (the solver this project used before NNLS): the best feasible
    affine-hull minimiser of any face."""
    k = gram.shape[0]
    best = np.inf
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            s = list(s)
            kkt = np.block([[gram[np.ix_(s, s)], np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            lam_s = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if lam_s.min() >= -1e-12:
                lam = np.zeros(k)
                lam[s] = lam_s
                best = min(best, float(lam @ gram @ lam))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_min_norm_matches_enumeration_on_degenerate_hulls(seed):
    """Duplicated, colinear, zero and in-cone rows, K up to 8, against the 2^K enumeration."""
    rng = np.random.default_rng(seed)
    k, d = rng.integers(2, 9), rng.integers(1, 6)
    g = rng.normal(size=(k, d)) + rng.uniform(0, 2)
    for i in range(k):
        kind = rng.integers(0, 5)
        j = rng.integers(0, k)
        if kind == 0:
            g[i] = g[j]
        elif kind == 1:
            g[i] = rng.uniform(0.1, 3) * g[j]
        elif kind == 2:
            g[i] = 0.0
        elif kind == 3:
            g[i] = rng.dirichlet(np.ones(k)) @ g * 0.5
    gram = g @ g.T
    lam = min_norm_weights_from_gram(gram)
    scaled = gram / max(np.abs(np.diag(gram)).max(), 1e-300)
    assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0, abs=1e-12)
    assert lam @ scaled @ lam <= _enumerate_min_norm(scaled) + 1e-9
    assert (scaled @ lam).min() >= lam @ scaled @ lam - 1e-9  # KKT certificate


@pytest.mark.parametrize("k", [16, 64, 256])
def test_min_norm_scales_to_many_sources(k):
    """The worst cases of scripts/bench_minnorm.py (one gradient inside the others' cone; nearly orthogonal
    gradients using every source) are solved exactly: feasible and KKT-certified, at K far beyond 2^K reach."""
    rng = np.random.default_rng(k)
    inside = rng.normal(size=(k, 64)) + 0.5
    inside[0] = 0.5 * rng.dirichlet(np.ones(k - 1)) @ inside[1:]
    ortho = rng.normal(size=(k, 2 * k)) * rng.uniform(0.5, 2.0, size=(k, 1))
    for g in (inside, ortho):
        lam = min_norm_weights(torch.tensor(g)).numpy().astype(np.float64)
        gram = g @ g.T / np.abs(np.diag(g @ g.T)).max()
        assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0, abs=1e-6)
        assert (gram @ lam).min() >= lam @ gram @ lam - 1e-7
    assert (lam > 0).sum() >= k // 2  # the orthogonal case uses most sources (a large active set)


def test_min_norm_rejects_bad_input():
    with pytest.raises(ValueError):
        min_norm_weights(torch.zeros(3))
    with pytest.raises(FloatingPointError):
        min_norm_weights(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))


def test_head_gradients_match_autograd_float64():
    torch.manual_seed(0)
    n, d, k = 12, 5, 3
    zc, zr = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    src = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 1, 1, 0, 0])
    diff = zc @ w - zr @ w
    got = per_source_head_gradients(zc, zr, diff, src, k + 1).double()  # source 3 absent
    for i in range(k):
        loss_i = -torch.nn.functional.logsigmoid((zc[src == i] - zr[src == i]) @ w).mean()
        (want,) = torch.autograd.grad(loss_i, w)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-5)  # float32 math inside
    assert torch.all(got[3] == 0)
    sums, counts = head_gradient_sums(zc, zr, diff, src, k)
    assert counts.tolist() == [6, 5, 1]


def test_momentum_and_normalisation():
    g = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    present = torch.tensor([True, False])
    m = update_momentum(None, g, 0.99, present)
    assert m.tolist() == [[3.0, 4.0], [0.0, 0.0]]
    m2 = update_momentum(m, torch.tensor([[1.0, 0.0], [5.0, 5.0]]), 0.5, present)
    assert m2.tolist() == [[2.0, 2.0], [0.0, 0.0]]  # absent source keeps its momentum
    np.testing.assert_allclose(normalize_gradients(g, "l2").norm(dim=1).numpy(), [1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize_gradients(g, "loss", torch.tensor([2.0, 4.0])).numpy(), [[1.5, 2], [0.25, 0]])
    assert torch.equal(normalize_gradients(g, "none"), g)
    with pytest.raises(ValueError):
        normalize_gradients(g, "max")
    with pytest.raises(ValueError):
        update_momentum(None, g, 0.0, present)


def test_more_weights_absent_source_gets_zero():
    sums = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    counts = torch.tensor([2.0, 0.0, 1.0])
    lam, mom = more_weights(sums, counts, torch.ones(3), None, alpha=0.99, normalize="l2")
    np.testing.assert_allclose(lam.numpy(), [0.5, 0.0, 0.5], atol=1e-6)
    assert mom[1].abs().sum() == 0


def test_momentum_direction_with_asymmetric_alpha():
    """alpha weighs the NEW gradient: m <- (1 - alpha) m + alpha g. At alpha = 0.5 both conventions agree, so
    pin it with alpha = 0.9 (hand-computed): the result stays near the new gradient, not the old momentum."""
    old = torch.tensor([[10.0, 0.0]])
    new = torch.tensor([[0.0, 10.0]])
    m = update_momentum(old, new, 0.9, torch.tensor([True]))
    assert m.tolist() == [[pytest.approx(1.0), pytest.approx(9.0)]]
    lam, mom = more_weights(new, torch.tensor([1.0]), torch.ones(1), old, alpha=0.9, normalize="none")
    torch.testing.assert_close(mom, torch.tensor([[1.0, 9.0]]))
