"""The SVD of a low-rank update scale * B A computed from its small factors: masks (the residual
strategy) and our method's controller both need the spectrum without forming the m x n matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """X = U diag(sigma) V^T with orthonormal columns (float64)."""

    U: torch.Tensor  # (m, R)
    sigma: torch.Tensor  # (R,), descending
    V: torch.Tensor  # (n, R)


def factored_svd(
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float = 1.0,
    col_weight: torch.Tensor | None = None,
) -> Spectrum:
    """SVD of scale * B A (times diag(col_weight) on the right) from QR of B and of A^T and an
    R x R SVD: O((m + n) R^2 + R^3) instead of O(m n R)."""
    b = B.detach().to(torch.float64)
    at = A.detach().to(torch.float64).t()
    if col_weight is not None:
        at = at * col_weight.to(at).unsqueeze(1)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(at)
    uc, sigma, vch = torch.linalg.svd(scale * (rb @ ra.t()))
    return Spectrum(qb @ uc, sigma, qa @ vch.t())
