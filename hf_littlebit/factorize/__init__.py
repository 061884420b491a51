"""Factorisers: turn a dense weight into one or two binary low-rank paths.

Every method maps ``(weight, rank, generator) → FactorPath``; :func:`factorize` adds what they share: fp32
compute, the residual path fitted to what the main path (with its scales already rounded to storage precision)
leaves over, the optional importance weighting of the input channels, and the cast of the scales to their storage
dtype. New methods register in :data:`FACTORIZERS`.

The math only: plain tensors in and out; imports nothing else of hf_littlebit and nothing of Transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import FactorPath, binary_sign, relative_error
from .dbf import dbf
from .dual_svid import dual_svid
from .joint_itq import joint_itq
from .lbadmm import lb_admm

# (weight, rank, generator, **method options) -> one path
Factorizer = Callable[..., FactorPath]

FACTORIZERS: dict[str, Factorizer] = {
    "littlebit": dual_svid,
    "littlebit2": joint_itq,
    "dbf": dbf,
    "lbadmm": lb_admm,
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
    input_importance: torch.Tensor | None = None,
    output_importance: torch.Tensor | None = None,
) -> list[FactorPath]:
    """Factor ``weight`` (d_out × d_in) into one path, or two with ``residual=True``.

    ``options`` are passed to the method (e.g. ``n_iter`` for ``littlebit2``); ``name`` only serves error messages
    (NaN/Inf in the weight, scale overflow). The residual path gets its own fit (with LittleBit-2 its own rotation).

    ``input_importance`` (d_in, non-negative; e.g. the mean squared input activation of each channel) makes the fit
    activation-aware: the method factors ``W diag(s)`` with ``s = √importance`` — whose error is the layer's output
    error on inputs with those second moments — and ``s`` is divided back out of the input scale ``g``. Signs,
    latents and the stored format are unchanged. ``output_importance`` (d_out; e.g. the mean squared gradient of the
    loss with respect to each output channel, an empirical Fisher diagonal) does the same on the other side: the
    method factors ``diag(o) W diag(s)`` with ``o = √importance``, and ``o`` is divided out of ``h`` — a diagonal
    approximation of the loss curvature around the layer (KFAC-style, as in DBF and NanoQuant).
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
    col = _importance_scale(input_importance, w.shape[1], w.device, f"{name}: input_importance")
    row = _importance_scale(output_importance, w.shape[0], w.device, f"{name}: output_importance")
    fit = FACTORIZERS[method]
    opts = options or {}
    generator = torch.Generator(device=w.device).manual_seed(seed)
    target = _weigh(w, row, col)
    paths = []
    for _ in range(2 if residual else 1):
        path = _unweight(fit(target, rank, generator, **opts), row, col).with_scale_dtype(scale_dtype, name)
        paths.append(path)
        # the residual fits what the stored main path (scales rounded) leaves over, in the same weighted norm
        target = target - _weigh(path.reconstruct(), row, col)
    return paths


def _weigh(w: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None) -> torch.Tensor:
    """``diag(row) · w · diag(col)`` (either side optional)."""
    if col is not None:
        w = w * col[None, :]
    if row is not None:
        w = w * row[:, None]
    return w


def _importance_scale(importance: torch.Tensor | None, size: int, device: torch.device, what: str
                      ) -> torch.Tensor | None:
    """``√importance`` (fp32, on the weight's device), with the floor that keeps every channel represented."""
    if importance is None:
        return None
    imp = importance.detach().float().to(device).flatten()
    if imp.numel() != size:
        raise ValueError(f"{what} has {imp.numel()} entries, the weight has {size} channels on that side")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    scale = imp.sqrt()
    # A channel never seen active keeps a small weight (relative to the mean) so the scales stay finite when divided
    # back.
    return scale.clamp_min(1e-3 * scale.mean().clamp_min(1e-12))


def _unweight(path: FactorPath, row: torch.Tensor | None, col: torch.Tensor | None) -> FactorPath:
    if row is None and col is None:
        return path
    h = path.h / row if row is not None else path.h
    g = path.g / col if col is not None else path.g
    return FactorPath(path.u, path.v, h, path.l, g)
