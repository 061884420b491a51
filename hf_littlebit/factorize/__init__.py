"""Factorisers: turn a dense weight into one or two binary low-rank paths.

Every method maps ``(weight, rank, generator) → FactorPath``; :func:`factorize` adds what they share: fp32
compute, the residual path fitted to what the main path (with its scales already rounded to storage precision)
leaves over, and the cast of the scales to their storage dtype. New methods register in :data:`FACTORIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import FactorPath, binary_sign, relative_error
from .dual_svid import dual_svid

Factorizer = Callable[[torch.Tensor, int, "torch.Generator | None"], FactorPath]

FACTORIZERS: dict[str, Factorizer] = {
    "littlebit": dual_svid,
}

__all__ = ["FACTORIZERS", "FactorPath", "binary_sign", "factorize", "relative_error"]


def factorize(
    weight: torch.Tensor,
    rank: int,
    method: str = "littlebit",
    residual: bool = True,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> list[FactorPath]:
    """Factor ``weight`` (d_out × d_in) into one path, or two with ``residual=True``.

    ``name`` only serves error messages (NaN/Inf in the weight, scale overflow).
    """
    if method not in FACTORIZERS:
        raise ValueError(f"unknown factorisation method {method!r}; available: {sorted(FACTORIZERS)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if rank < 1:
        raise ValueError(f"{name}: rank must be ≥ 1, got {rank}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name}: weight contains {bad} NaN/Inf values; fix the checkpoint before quantizing")
    fit = FACTORIZERS[method]
    generator = torch.Generator(device=w.device).manual_seed(seed)
    main = fit(w, rank, generator).with_scale_dtype(scale_dtype, name)
    paths = [main]
    if residual:
        paths.append(fit(w - main.reconstruct(), rank, generator).with_scale_dtype(scale_dtype, name))
    return paths
