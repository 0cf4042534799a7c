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

import warnings

import numpy as np
import torch


NORMALIZE_MODES = ("l2", "none", "loss")


def two_source_note(n_sources: int, normalize: str, key: str = "normalize") -> str | None:
    """Why MORE on exactly two sources under l2 normalisation is the Uniform baseline (None otherwise): the
    min-norm point of the segment between two unit vectors u, v is their midpoint (||l u + (1 - l) v||^2 is
    minimised at l = (1 - u.v) / (2 - 2 u.v) = 1/2), so both weights are 0.5 at every step and the loss is
    Uniform's. `key` names the setting in the caller's terms (`reward.train.normalize` in a recipe)."""
    if n_sources != 2 or normalize != "l2":
        return None
    return (
        f"MORE on two sources with {key}=l2 is exactly the Uniform baseline: the min-norm point between two unit "
        "vectors is their midpoint, so both source weights are 0.5 at every step and the loss is Uniform's (the "
        f"paper's code behaves the same). For weights that move, set {key} to none or loss, or train on more sources"
    )


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

    NNLS reformulation (polynomial; SciPy's Lawson-Hanson active-set solver): with G = R^T R,
        min_{u >= 0} ||R u||^2 + (1^T u - 1)^2
    is, for u = t * lambda with lambda on the simplex, t^2 * lambda^T G lambda + (t - 1)^2, minimised by the
    simplex minimiser lambda* for every t > 0; so lambda* = u* / sum(u*). R is the Cholesky factor of G plus
    a 1e-12 (relative) ridge, which keeps singular Grams (duplicated, zero or colinear gradients) factorable
    and moves the optimum by far less than `tol`.
    Ties: the optimal set can be a whole face (duplicated gradients, all-zero gradients). The weight is then
    split evenly: the face's KKT-tight coordinates {j : (G lambda)_j = lambda^T G lambda} are re-solved with
    the minimum-norm least-squares solution of the KKT system [[G_S, 1], [1^T, 0]] [lambda_S; mu] = [0; 1],
    kept when it is feasible. The returned point is always checked against the KKT certificate
    (G lambda >= lambda^T G lambda on every coordinate, which for this convex problem proves optimality).
    Worst-case cost is measured by scripts/bench_minnorm.py (K = 8 ... 256).
    """
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0] if gram.ndim == 2 else 0
    if gram.shape != (k, k) or k == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {gram.shape}")
    if not np.all(np.isfinite(gram)):
        raise FloatingPointError("min-norm solve got a non-finite Gram matrix: the gradients contain NaN or inf")
    gram = 0.5 * (gram + gram.T)
    scale = max(float(np.abs(np.diag(gram)).max()), 1e-300)
    g = gram / scale  # scale-free tolerances
    if k == 1:
        return np.ones(1)
    with _single_thread_blas(k):
        return _min_norm_scaled(g, tol)


_BLAS = []


def _single_thread_blas(k: int):
    """One BLAS thread for the K x K solve when K is large enough for OpenBLAS to go parallel: on a busy
    machine its threads cost 100x (measured: a 256 x 256 Cholesky 3 ms vs 300 ms). Small K: no change."""
    import contextlib

    if k < 48:
        return contextlib.nullcontext()
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS.append(ThreadpoolController())
        except ImportError:  # optional: without it the solve is still exact, only slower on a busy machine
            _BLAS.append(None)
    return contextlib.nullcontext() if _BLAS[0] is None else _BLAS[0].limit(limits=1, user_api="blas")


def _min_norm_scaled(g: np.ndarray, tol: float) -> np.ndarray:
    from scipy.linalg import lu_factor, lu_solve
    from scipy.optimize import nnls

    k = g.shape[0]

    def certified(lam):
        return lam is not None and (g @ lam).min() >= float(lam @ g @ lam) - tol

    ridge = 1e-12
    while True:
        try:
            chol = np.linalg.cholesky(g + ridge * np.eye(k))
            break
        except np.linalg.LinAlgError:  # rounding made G slightly indefinite: a larger ridge
            ridge *= 100
            if ridge > 1e-6:
                w, v = np.linalg.eigh(g)
                chol = v * np.sqrt(np.clip(w, 0, None))
                break
    lhs = np.vstack([chol.T, np.ones((1, k))])
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    u = nnls(lhs, rhs, maxiter=50 * k)[0]
    if not u.sum() > 0:
        raise FloatingPointError("min-norm solve failed: the NNLS solution is zero")
    lam = u / u.sum()
    # Polish on the tight coordinates (removes the ridge's bias) and split ties evenly there.
    val = float(lam @ g @ lam)
    tight = np.flatnonzero(g @ lam <= val + 1e-7)
    if len(tight) > 1:
        n = len(tight)
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = g[np.ix_(tight, tight)]
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        e = np.zeros(n + 1)
        e[n] = 1.0
        with warnings.catch_warnings():  # a singular face warns; handled just below
            warnings.simplefilter("ignore")
            lu, piv = lu_factor(kkt, check_finite=False)
        pivots = np.abs(np.diag(lu))
        if pivots.min() > 1e-10 * pivots.max():  # nonsingular: the face's optimum is unique (cheap LU solve)
            lam_s = lu_solve((lu, piv), e, check_finite=False)[:n]
        else:  # singular face (a tie): the minimum-norm solution splits the weight evenly
            lam_s = np.linalg.lstsq(kkt, e, rcond=None)[0][:n]
        if lam_s.min() >= -1e-9 and abs(lam_s.sum() - 1.0) <= 1e-6:
            even = np.zeros(k)
            even[tight] = np.clip(lam_s, 0.0, None)
            even /= even.sum()
            if certified(even) and float(even @ g @ even) <= val + tol:
                return even
    if certified(lam):
        return lam
    raise FloatingPointError("min-norm solve found no certified optimum: the gradients contain NaN or inf")


def min_norm_weights(grads: torch.Tensor) -> torch.Tensor:
    """The minimum-norm point of the convex hull of the rows of `grads` [K, d], as simplex weights [K].

    Only the K x K Gram matrix leaves the device (one matmul in float64); the solve is exact.
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must be [K, d], got shape {tuple(grads.shape)}")
    if grads.shape[0] == 1:  # one source: the hull is one point, its weight 1 (whatever its value, as TRL's loss)
        return torch.ones(1, dtype=grads.dtype, device=grads.device)
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
