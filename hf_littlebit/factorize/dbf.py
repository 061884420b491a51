"""Double Binary Factorization (DBF, METHODS.md §6): the signs are *optimised* against the weight.

DBF writes ``W ≈ A B`` where each factor lies in the "SVID set" ``{diag(p) S diag(q): S ∈ {±1}, p, q ≥ 0}``, so
``A B = diag(p_a) S_A diag(q_a ⊙ p_b) S_B diag(q_b)``: exactly one LittleBit path with ``h = p_a``,
``l = q_a ⊙ p_b``, ``g = q_b``. The SVD-based initialisers read the signs off a continuous factorisation; DBF instead
alternates between the two factors, solving each as a least-squares problem constrained to the SVID set with a
few ADMM steps (projection = sign times the rank-1 fit of the magnitudes). The constraint is phased in: its penalty
grows from 0 to 1 as ``(t / (T − 3))³`` over the ``T`` outer iterations, so the early iterations are close to an
unconstrained alternating least squares (which finds the dominant subspace) and the late ones settle the signs.

Plain tensors in, a :class:`FactorPath` out; fp32 on the weight's device.
"""

from __future__ import annotations

import torch

from .base import FactorPath, binary_sign
from .dual_svid import rank1_nonnegative, svid_scales

DEFAULT_ITERATIONS = 100
DEFAULT_INNER = 3
DEFAULT_RIDGE = 0.03
PROJECTION_POWER_STEPS = 5


def svid_projection(m: torch.Tensor, power_steps: int = PROJECTION_POWER_STEPS) -> torch.Tensor:
    """Nearest-ish point of the SVID set: ``sgn(M) ⊙ (p qᵀ)`` with ``p qᵀ`` the rank-1 fit of ``|M|``."""
    p, q = rank1_nonnegative(m.abs(), max_iter=power_steps, tol=0.0)
    return binary_sign(m) * torch.outer(p, q)


def _admm_solve(
    fixed: torch.Tensor, target: torch.Tensor, z: torch.Tensor, dual: torch.Tensor, rho0: float, inner: int,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``min_X ‖X F − Y‖² + ridge`` with ``X`` in the SVID set, by ``inner`` ADMM steps from ``(Z, D)``.

    The first x-step uses the warm-up penalty ``rho0``, the others ``ρ = 1``. Returns the projected ``Z`` (the new
    factor) and the dual variable.
    """
    gram = fixed @ fixed.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * gram.diagonal().mean() * eye
    rhs = target @ fixed.T
    for step in range(inner):
        rho = rho0 if step == 0 else 1.0
        # X (G + ρI) = Y Fᵀ + ρ (Z − D); G is symmetric positive definite.
        chol = torch.linalg.cholesky(gram + rho * eye)
        x = torch.cholesky_solve((rhs + rho * (z - dual)).T, chol).T
        z = svid_projection(x + dual)
        dual = dual + x - z
    return z, dual


def dbf(
    weight: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    n_iter: int = DEFAULT_ITERATIONS,
    inner: int = DEFAULT_INNER,
    ridge: float = DEFAULT_RIDGE,
) -> FactorPath:
    """One DBF path of middle dimension ``rank`` for ``weight`` (d_out × d_in); ``rank`` may exceed min(shape).

    ``n_iter`` outer alternations of ``inner`` ADMM steps each, Tikhonov ``ridge`` relative to the Gram diagonal.
    Random Gaussian start from ``generator``. Scales in fp32.
    """
    w = weight.float()
    d_out, d_in = w.shape
    if n_iter < 1 or inner < 1:
        raise ValueError(f"dbf: n_iter and inner must be ≥ 1, got {n_iter} and {inner}")
    a = torch.randn(d_out, rank, generator=generator, device=w.device, dtype=torch.float32)
    b = torch.randn(rank, d_in, generator=generator, device=w.device, dtype=torch.float32)
    dual_a = torch.zeros_like(a)
    dual_b = torch.zeros_like(b)
    for t in range(n_iter):
        rho0 = min(1.0, t / max(n_iter - 3, 1)) ** 3
        b_n = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)  # the product's scale lives in A for the A-step
        a, dual_a = _admm_solve(b_n, w, a, dual_a, rho0, inner, ridge)
        a_n = a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)
        bt, dual_bt = _admm_solve(a_n.T, w.T, b.T, dual_b.T, rho0, inner, ridge)
        b, dual_b = bt.T, dual_bt.T
    # Final product: a_n @ b (b was solved against the column-normalised a). Both lie in the SVID set; split each
    # into (outer scale, sign, inner scale) and merge the two inner scales into l.
    h, l, g = svid_scales(a_n, b)  # noqa: E741
    # Latents: the factors themselves (their signs are the binary matrices; magnitudes help QAT pick what to flip).
    return FactorPath(u=a_n, v=b, h=h, l=l, g=g)
