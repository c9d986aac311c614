"""IRLS quadratic rank and sparsity penalties on an adapter, computed from its small factors.

Rank (Q3R on adapters): for X = scale * B A with SVD U diag(sigma) V^T and smoothing eps, the
weights P_L = U diag(d) U^T + (I - U U^T), d_i = min(eps / sigma_i, 1), and P_R likewise from V,
are frozen between refreshes; the penalty <X, P_L X P_R> is quadratic in X and, in the singular
basis, weights coefficient (i, j) by d_i d_j: directions with sigma below eps decay like weight
decay, large ones barely feel it. Everything is computed from (m + n) x R and R x R products:
the m x n matrix X is never formed.

Sparsity (IRLS for sparsity): w = delta^2 / max(|s|, delta)^2, penalty sum w s^2.

Both are applied as decoupled steps after the optimizer's (as AdamW applies weight decay), so
Adam's per-coordinate scaling does not undo the weighting; no gradient flows through the SVD.
"""

from __future__ import annotations

import torch


def rank_weights(sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """d_i = min(eps / sigma_i, 1) (1 where sigma_i = 0)."""
    return torch.where(sigma > eps, eps / sigma.clamp_min(1e-300), torch.ones_like(sigma))


def rank_penalty(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    U: torch.Tensor,
    V: torch.Tensor,
    d: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value of <X, P_L X P_R> for X = scale * B A, and its gradients w.r.t. B and A.

    With a = 1 - d: P_L X P_R = X - U a U^T X - X V a V^T + U a (U^T X V) a V^T. The gradient
    w.r.t. X is 2 P_L X P_R; w.r.t. B it is scale * that @ A^T, w.r.t. A scale * B^T @ that.
    U, V, d are frozen (no gradient flows through the SVD).
    """
    s = scale
    U, V, a = U.to(B), V.to(B), (1.0 - d).to(B)
    Bu = U.t() @ B  # (R, r): U^T B
    Av = A @ V  # (r, R): A V
    AAt = A @ A.t()
    BtB = B.t() @ B
    UtX = s * (Bu @ A)  # (R, n)
    XV = s * (B @ Av)  # (m, R)
    UtXV = s * (Bu @ Av)  # (R, R)
    aUtXVa = a.unsqueeze(1) * UtXV * a.unsqueeze(0)
    # (P_L X P_R) A^T, an (m, r) matrix
    VtAt = Av.t()
    MAt = (
        s * (B @ AAt)
        - U @ (a.unsqueeze(1) * (s * (Bu @ AAt)))
        - XV @ (a.unsqueeze(1) * VtAt)
        + U @ (aUtXVa @ VtAt)
    )
    # B^T (P_L X P_R), an (r, n) matrix
    BtU = Bu.t()
    BtM = s * (BtB @ A) - (BtU * a) @ UtX - ((s * (BtB @ Av)) * a) @ V.t() + (BtU @ aUtXVa) @ V.t()
    value = s * (A * BtM).sum()  # <X, M> = s tr(A^T B^T M)
    return value, 2.0 * s * MAt, 2.0 * s * BtM


def dense_rank_penalty(X: torch.Tensor, U: torch.Tensor, V: torch.Tensor, d: torch.Tensor):
    """<X, P_L X P_R> with P_L and P_R formed explicitly (the reference the tests check against)."""
    m, n = X.shape
    P_L = U @ torch.diag(d) @ U.t() + torch.eye(m, dtype=X.dtype) - U @ U.t()
    P_R = V @ torch.diag(d) @ V.t() + torch.eye(n, dtype=X.dtype) - V @ V.t()
    return (X * (P_L @ X @ P_R)).sum()


def sparse_weights(values: torch.Tensor, delta: float) -> torch.Tensor:
    """w = delta^2 / max(|s|, delta)^2: 1 below delta, ~ (delta/|s|)^2 above."""
    mag = values.detach().abs().clamp_min(delta)
    return (delta / mag) ** 2


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry (1-based); 0 when there are fewer than k."""
    if k < 1:
        return float("inf")
    if k > values.numel():
        return 0.0
    return float(torch.topk(values.reshape(-1), k).values[-1])
