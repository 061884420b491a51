"""Dual-SVID initialisation (LittleBit, METHODS.md §1.2).

1. Truncated SVD ``W ≈ P_r Σ_r Q_rᵀ``, exact and in fp32 on the weight's device.
2. Balanced split ``U = P_r Σ_r^½``, ``V = Σ_r^½ Q_rᵀ``.
3. Model each factor's magnitudes by a rank-1 outer product (OneBit's SVID applied to both factors):
   ``|U| ≈ a bᵀ`` and ``|V| ≈ c eᵀ``, giving ``h = a``, ``l = b ⊙ c``, ``g = e``.

The rank-1 fits use power iteration from an all-ones start, which converges to the Perron vectors of the
non-negative matrix, so the scales come out non-negative without a sign fix-up.
"""

from __future__ import annotations

import torch

from .base import FactorPath, balance_scales


def rank1_nonnegative(a: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular pair of a non-negative matrix as ``(√σ·p, √σ·q)`` with ``p, q ≥ 0``."""
    x = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    x = x / x.norm()
    sigma = a.new_zeros(())
    y = a.new_zeros(a.shape[0])
    for _ in range(max_iter):
        y = a @ x
        y_norm = y.norm()
        if y_norm == 0:
            return torch.zeros_like(y), torch.zeros_like(x)
        y = y / y_norm
        x_new = a.T @ y
        new_sigma = x_new.norm()
        x = x_new / new_sigma
        converged = (new_sigma - sigma).abs() <= tol * new_sigma
        sigma = new_sigma
        if converged:
            break
    root = sigma.sqrt()
    return root * y, root * x


def balanced_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = P_r Σ_r^½`` (d_out × rank) and ``V = Σ_r^½ Q_rᵀ`` (rank × d_in), zero-padded if rank > min(shape)."""
    w = weight.float()
    p, s, qh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    u = w.new_zeros(w.shape[0], rank)
    v = w.new_zeros(rank, w.shape[1])
    u[:, :k] = p[:, :k] * root
    v[:k] = root[:, None] * qh[:k]
    return u, v


def svid_scales(
    u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales ``(h, l, g)`` from rank-1 models of ``|U|`` and ``|V|`` (shared by Dual-SVID and its variants)."""
    a, b = rank1_nonnegative(u.abs())
    c, e = rank1_nonnegative(v.abs())
    return balance_scales(a, b * c, e)


def dual_svid(weight: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> FactorPath:
    """One Dual-SVID path of the given rank for ``weight`` (d_out × d_in); scales in fp32."""
    del generator  # exact SVD: nothing random
    u, v = balanced_svd_factors(weight, rank)
    h, l, g = svid_scales(u, v)  # noqa: E741
    return FactorPath(u=u, v=v, h=h, l=l, g=g)
