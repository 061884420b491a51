"""Latent-binary ADMM (LB-ADMM, the initialiser of NanoQuant; NANOQUANT.md §3): both factors at once, one ADMM step
each per iteration, under a rising penalty.

The problem is ``min ½‖W − A Bᵀ‖² + λ/2 (‖A‖² + ‖B‖²)`` with ``A`` (d_out × r) and ``B`` (d_in × r) tied by an ADMM
penalty ``ρ`` to proxies ``Z_A``, ``Z_B`` in the *sign-value* family ``sgn(T) ⊙ p qᵀ`` (the SVID set: the signs of
``T`` times the rank-1 fit of ``|T|``). A product of two such matrices is exactly one binary low-rank path, so the
proxies are the answer.

How it differs from :mod:`.dbf` (which alternates several constrained ADMM solves per factor under a cubic
warm-up):

- one x-step / projection / dual step per factor per iteration, with ``ρ`` rising *linearly* from ~0 to 1 over all
  iterations, so the unconstrained alternating least squares first finds the dominant subspace and the sign
  constraint tightens gradually while both factors move;
- the duals start at ``start − P(start)`` (not zero), so the first x-steps already pull toward the proxies;
- the latents handed to block reconstruction are the *continuous* ADMM variables ``factor + Λ`` (column-normalised),
  not the ±1 proxies: their magnitudes say how sure each sign is, so the straight-through fit flips the unsure
  entries first. They stay in the preconditioned space (row ``i`` of ``U`` carries ``D_out[i]``, row ``j`` of ``V``
  ``D_in[j]``), as the latents of every other factoriser here do; NanoQuant divides the preconditioners back out of
  its latents, which changes no sign, only which entries a latent-space step reaches first.

The preconditioning ``diag(D_out) · W · diag(D_in)`` of the method is :func:`hf_littlebit.factorize.factorize`'s
``output_importance`` / ``input_importance``: this module only sees the already-weighted matrix. Plain tensors in, a
:class:`FactorPath` out, fp32 on the weight's device.
"""

from __future__ import annotations

import torch

from .base import FactorPath
from .dbf import svid_projection
from .dual_svid import svid_scales

DEFAULT_ITERATIONS = 100
DEFAULT_RIDGE = 0.03


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _x_step(fixed: torch.Tensor, target: torch.Tensor, z: torch.Tensor, dual: torch.Tensor, rho: float,
            ridge: float) -> torch.Tensor:
    """``argmin_X ½‖target − X fixedᵀ‖² + ridge/2 ‖X‖² + ρ/2 ‖X − (Z − Λ)‖²`` (an r × r Cholesky solve).

    ``fixed`` has unit columns, so ``ridge`` and ``ρ`` are relative to the data term whatever the weight's scale."""
    rank = fixed.shape[1]
    gram = fixed.T @ fixed + (rho + ridge) * torch.eye(rank, dtype=fixed.dtype, device=fixed.device)
    rhs = fixed.T @ target.T + rho * (z - dual).T  # r × rows(target)
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(gram)).T


def lb_admm(
    weight: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    n_iter: int = DEFAULT_ITERATIONS,
    ridge: float = DEFAULT_RIDGE,
) -> FactorPath:
    """One binary low-rank path of middle dimension ``rank`` for ``weight`` (d_out × d_in) by LB-ADMM.

    ``n_iter`` iterations (penalty ``ρ_t = (t + 1) / n_iter``), Tikhonov ``ridge`` relative to the unit-column Gram
    matrix, random Gaussian start from ``generator``. Scales in fp32; latents are the continuous ADMM variables.
    """
    if n_iter < 1:
        raise ValueError(f"lbadmm: n_iter must be ≥ 1, got {n_iter}")
    if ridge < 0:
        raise ValueError(f"lbadmm: ridge must be ≥ 0, got {ridge}")
    w = weight.float()
    d_out, d_in = w.shape
    a = torch.randn(d_out, rank, generator=generator, device=w.device, dtype=torch.float32)
    b = torch.randn(d_in, rank, generator=generator, device=w.device, dtype=torch.float32)
    z_a, z_b = svid_projection(a), svid_projection(b)
    dual_a, dual_b = a - z_a, b - z_b
    for t in range(n_iter):
        rho = (t + 1) / n_iter
        # A carries the product's magnitude in its step (B's proxy normalised), then B in its own.
        a = _x_step(_unit_columns(z_b), w, z_a, dual_a, rho, ridge)
        t_a = a + dual_a
        z_a = svid_projection(t_a)
        dual_a = t_a - z_a
        b = _x_step(_unit_columns(z_a), w.T, z_b, dual_b, rho, ridge)
        t_b = b + dual_b
        z_b = svid_projection(t_b)
        dual_b = t_b - z_b
    # The last B-step fitted W ≈ unit(Z_A) · Bᵀ: export that product. Each factor is sgn ⊙ p qᵀ; the two inner
    # scales merge into l.
    h, l, g = svid_scales(_unit_columns(z_a), z_b.T)  # noqa: E741
    # Latents: the continuous variables ``factor + Λ`` whose projections the proxies are (same signs by construction;
    # an exact zero gets a tiny positive magnitude so it keeps sgn(0) = +1 once normalised).
    u = _unit_columns(torch.where(t_a == 0, 1e-12, t_a))
    v = _unit_columns(torch.where(t_b == 0, 1e-12, t_b))
    return FactorPath(u=u, v=v.T.contiguous(), h=h, l=l, g=g)
