"""Internal Latent Rotation with Joint-ITQ (LittleBit-2, METHODS.md §5).

``U V = (U R)(Rᵀ V)`` for any orthogonal ``R``, but the signs of the rotated factors differ. Joint-ITQ picks the
rotation that brings the rows of both factors closest to a scaled hypercube, by iterative quantisation on the
stacked matrix ``X = [U; Vᵀ]`` ((d_out + d_in) × r): alternately ``B = sgn(X R)`` and the orthogonal Procrustes
step ``R = Q Pᵀ`` with ``Bᵀ X = P Ω Qᵀ``. One shared rotation is required: only it cancels between the factors,
so the stored format and the forward pass are exactly LittleBit's (zero inference cost).
"""

from __future__ import annotations

import torch

from .base import FactorPath, binary_sign
from .dual_svid import balanced_svd_factors, svid_scales

DEFAULT_ITERATIONS = 50


def random_orthogonal(n: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    g = torch.randn(n, n, generator=generator, device=device, dtype=torch.float32)
    q, r = torch.linalg.qr(g)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def itq_rotation(
    x: torch.Tensor, n_iter: int = DEFAULT_ITERATIONS, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Orthogonal ``R`` (r × r) minimising ``‖sgn(XR) − XR‖_F`` over the rows of ``x``; also the objective per step.

    The objective ``‖B − XR‖²_F`` is recorded after each sign step; neither half-step can increase it.
    """
    rot = random_orthogonal(x.shape[1], generator, x.device)
    history = []
    for _ in range(n_iter):
        xr = x @ rot
        b = binary_sign(xr)
        history.append((b - xr).pow(2).sum().item())
        p, _, qh = torch.linalg.svd(b.T @ x)
        rot = qh.T @ p.T
    xr = x @ rot
    history.append((binary_sign(xr) - xr).pow(2).sum().item())
    return rot, history


def joint_itq(
    weight: torch.Tensor, rank: int, generator: torch.Generator | None = None, n_iter: int = DEFAULT_ITERATIONS
) -> FactorPath:
    """One LittleBit-2 path: balanced SVD factors, rotated by Joint-ITQ, then the Dual-SVID scales."""
    u, v = balanced_svd_factors(weight, rank)
    rot, _ = itq_rotation(torch.cat([u, v.T], dim=0), n_iter, generator)
    u, v = u @ rot, rot.T @ v
    h, l, g = svid_scales(u, v)  # noqa: E741
    return FactorPath(u=u, v=v, h=h, l=l, g=g)
