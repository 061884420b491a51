"""Factorisers: turn a dense weight into one or two binary low-rank paths.

Every method maps ``(weight, rank, generator) → FactorPath``; :func:`factorize` adds what they share: fp32
compute, the residual path fitted to what the main path (with its scales already rounded to storage precision)
leaves over, and the cast of the scales to their storage dtype. New methods register in :data:`FACTORIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import FactorPath, binary_sign, relative_error
from .dual_svid import dual_svid
from .joint_itq import joint_itq

# (weight, rank, generator, **method options) -> one path
Factorizer = Callable[..., FactorPath]

FACTORIZERS: dict[str, Factorizer] = {
    "littlebit": dual_svid,
    "littlebit2": joint_itq,
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
    options: dict[str, Any] | None = None,
) -> list[FactorPath]:
    """Factor ``weight`` (d_out × d_in) into one path, or two with ``residual=True``.

    ``options`` are passed to the method (e.g. ``n_iter`` for ``littlebit2``); ``name`` only serves error messages
    (NaN/Inf in the weight, scale overflow). The residual path gets its own fit (with LittleBit-2 its own rotation).
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
    opts = options or {}
    generator = torch.Generator(device=w.device).manual_seed(seed)
    main = fit(w, rank, generator, **opts).with_scale_dtype(scale_dtype, name)
    paths = [main]
    if residual:
        paths.append(fit(w - main.reconstruct(), rank, generator, **opts).with_scale_dtype(scale_dtype, name))
    return paths
