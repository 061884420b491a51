"""Forward implementations of :class:`~hf_littlebit.layer.LittleBitLinear` and the choice between them.

Only the plain-PyTorch path exists today; it is exact to the reference formula and runs everywhere. A Triton path
registers itself in :data:`BACKENDS` and is picked by :func:`select_backend`, so the layer never changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layer import LittleBitLinear

ENV_BACKEND = "LITTLEBIT_BACKEND"


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow and inexact there); the input's dtype on accelerators."""
    if x.device.type == "cpu" or not x.dtype.is_floating_point:
        return torch.float32
    return x.dtype


def torch_forward(layer: LittleBitLinear, x: torch.Tensor) -> torch.Tensor:
    """``Y = ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h`` per path, summed, plus bias.

    Packed layers use their cached unpacked signs; trainable layers take the signs of their latents through the
    sign estimator, so the same code is differentiable with respect to latents, scales and input.
    """
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"LittleBitLinear expects inputs with last dim {layer.in_features}, got {tuple(x.shape)}")
    dtype = compute_dtype_for(x)
    xs = x.reshape(-1, layer.in_features).to(dtype)
    prefixes = layer.path_prefixes if layer.residual_enabled else layer.path_prefixes[:1]
    y = None
    for prefix in prefixes:
        out = path_forward(layer, prefix, xs, dtype)
        y = out if y is None else y + out
    if layer.bias is not None:
        y = y + layer.bias.to(device=x.device, dtype=dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def path_forward(layer: LittleBitLinear, prefix: str, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One path's ``((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h`` on 2-D ``xs`` already in ``dtype``."""
    if layer.is_trainable:
        u, v = layer.latent_signs(prefix, dtype)
    else:
        u, v = layer.signs(prefix, xs.device, dtype)
    h, l, g = (getattr(layer, prefix + n).to(device=xs.device, dtype=dtype) for n in ("h", "l", "g"))  # noqa: E741
    z = ((xs * g) @ v.T) * l
    return (z @ u.T) * h


BACKENDS: dict[str, Callable[[LittleBitLinear, torch.Tensor], torch.Tensor]] = {"torch": torch_forward}


def select_backend(layer: LittleBitLinear, x: torch.Tensor) -> str:
    """Backend name for this call: the layer's choice, else ``$LITTLEBIT_BACKEND``, else ``"auto"``."""
    choice = layer.backend or os.environ.get(ENV_BACKEND, "auto")
    if choice == "auto":
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown LittleBit backend {choice!r}; available: {sorted(BACKENDS)} or 'auto'")
    return choice


def littlebit_forward(layer: LittleBitLinear, x: torch.Tensor) -> torch.Tensor:
    if layer.is_trainable:  # fast kernels serve packed layers only
        return torch_forward(layer, x)
    return BACKENDS[select_backend(layer, x)](layer, x)
