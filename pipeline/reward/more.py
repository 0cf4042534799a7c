"""The math of MORE (Zeng et al. 2023), as small pure functions.

Per optimizer micro-step, for sources i = 1..K:
  g_i    = grad of source i's Bradley-Terry loss w.r.t. the reward head w, computed in closed form from
           the pooled features z the forward pass already produced:
           g_i = -(1/|B_i|) sum_b sigmoid(-(r_c - r_r)) (z_c - z_r)                  (head_gradient_sums)
  m_i    <- (1 - alpha) m_i + alpha g_i                                                (update_momentum)
  m_i    <- m_i / ||m_i||  (or unchanged, or / loss_i)                               (normalize_gradients)
  lambda = argmin_{lambda in simplex} || sum_i lambda_i m_i ||^2                       (min_norm_weights)
  L      = sum_i lambda_i BT_loss_i
The functions take and return torch tensors; the K x K solve runs in float64.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

NORMALIZE_MODES = ("l2", "none", "loss")


def head_gradient_sums(
    z_chosen: torch.Tensor,
    z_rejected: torch.Tensor,
    reward_diff: torch.Tensor,
    source_ids: torch.Tensor,
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source SUMS of the Bradley-Terry head gradient, and per-source pair counts.

    `reward_diff` is r_chosen - r_rejected (minus the margin when one is used). Sums rather than means
    so that data-parallel ranks can add them before dividing by the global counts.
    Returns `(sums [K, d], counts [K])` in float32 on the features' device.
    """
    z_chosen, z_rejected = z_chosen.detach().float(), z_rejected.detach().float()
    coef = -torch.sigmoid(-reward_diff.detach().float())  # dL/d(r_c - r_r) for L = -log sigmoid(r_c - r_r)
    per_pair = coef.unsqueeze(-1) * (z_chosen - z_rejected)  # [B, d]
    sums = torch.zeros(num_sources, per_pair.shape[-1], device=per_pair.device, dtype=per_pair.dtype)
    sums.index_add_(0, source_ids, per_pair)
    counts = torch.bincount(source_ids, minlength=num_sources).to(per_pair.dtype)
    return sums, counts


def per_source_head_gradients(z_chosen, z_rejected, reward_diff, source_ids, num_sources) -> torch.Tensor:
    """Mean head gradient of each source's BT loss, [K, d]; a source absent from the batch gets zeros."""
    sums, counts = head_gradient_sums(z_chosen, z_rejected, reward_diff, source_ids, num_sources)
    return sums / counts.clamp(min=1).unsqueeze(-1)


def update_momentum(momentum: torch.Tensor | None, grads: torch.Tensor, alpha: float, present: torch.Tensor):
    """m <- (1 - alpha) m + alpha g for present sources; absent sources keep their momentum.

    `alpha` weighs the NEW gradient (the paper's 0.99). The first observation initialises m = g.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if momentum is None:
        return torch.where(present.unsqueeze(-1), grads, torch.zeros_like(grads))
    new = (1.0 - alpha) * momentum + alpha * grads
    return torch.where(present.unsqueeze(-1), new, momentum)


def normalize_gradients(grads: torch.Tensor, mode: str = "l2", losses: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each row: 'l2' to unit norm (zero rows stay zero), 'none', or 'loss' (divide by the source's loss)."""
    if mode == "none":
        return grads
    if mode == "l2":
        return grads / grads.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if mode == "loss":
        if losses is None:
            raise ValueError("normalize='loss' needs the per-source losses")
        return grads / losses.clamp(min=1e-12).unsqueeze(-1)
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")


def min_norm_weights_from_gram(gram: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """Exact minimiser of lambda^T G lambda over the probability simplex, for a PSD Gram matrix G (K x K).

    Active-set enumeration: the optimum is the min-norm point of the affine hull of some face of the
    simplex, where the KKT system [[G_S, 1], [1^T, 0]] [lambda_S; mu] = [0; 1] holds. Every support S is
    tried (least squares handles singular faces from duplicated, opposing, zero or colinear rows); a
    candidate is returned if it is feasible (lambda >= 0) and optimal (G lambda >= lambda^T G lambda on
    every coordinate, which for this convex problem certifies the global minimum). Supports are tried
    from the largest down, so ties (duplicates, all-zero gradients) split the weight evenly.
    Cost 2^K small solves: K <= 12 in practice (the paper uses 5).
    """
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    if gram.shape != (k, k) or k == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {gram.shape}")
    if k > 16:
        raise ValueError(f"exact enumeration over {k} sources is too costly; at most 16 are supported")
    if not np.all(np.isfinite(gram)):
        raise FloatingPointError("min-norm solve got a non-finite Gram matrix: the gradients contain NaN or inf")
    gram = 0.5 * (gram + gram.T)
    scale = max(float(np.abs(np.diag(gram)).max()), 1e-300)
    g = gram / scale  # scale-free tolerances
    for size in range(k, 0, -1):  # largest supports first: ties split the weight evenly
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = g[np.ix_(s, s)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            lam_s = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if lam_s.min() < -1e-9 or abs(lam_s.sum() - 1.0) > 1e-6:
                continue
            lam = np.zeros(k)
            lam[s] = np.clip(lam_s, 0.0, None)
            lam /= lam.sum()
            val = float(lam @ g @ lam)
            # Convex QP on the simplex: lam is optimal iff no vertex has a smaller directional value.
            if (g @ lam).min() >= val - tol:
                return lam
    # unreachable for a PSD matrix; guards against NaN input
    raise FloatingPointError("min-norm solve found no feasible point: the gradients contain NaN or inf")


def min_norm_weights(grads: torch.Tensor) -> torch.Tensor:
    """The minimum-norm point of the convex hull of the rows of `grads` [K, d], as simplex weights [K].

    Only the K x K Gram matrix leaves the device (one matmul in float64); the solve is exact.
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must be [K, d], got shape {tuple(grads.shape)}")
    gram = (grads.double() @ grads.double().T).cpu().numpy()
    lam = min_norm_weights_from_gram(gram)
    return torch.as_tensor(lam, dtype=grads.dtype, device=grads.device)


def more_weights(
    grad_sums: torch.Tensor,
    counts: torch.Tensor,
    loss_sums: torch.Tensor,
    momentum: torch.Tensor | None,
    *,
    alpha: float = 0.99,
    normalize: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MORE step from (globally reduced) per-source statistics: returns `(lambda [K], new momentum)`.

    Sources with no pair in the batch get weight 0 and keep their momentum.
    """
    present = counts > 0
    grads = grad_sums / counts.clamp(min=1).unsqueeze(-1)
    momentum = update_momentum(momentum, grads, alpha, present)
    losses = loss_sums / counts.clamp(min=1)
    normed = normalize_gradients(momentum[present], normalize, losses[present])
    lam = torch.zeros_like(counts, dtype=grad_sums.dtype)
    lam[present] = min_norm_weights(normed)
    return lam, momentum
