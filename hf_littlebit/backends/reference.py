"""The plain-PyTorch forward of a packed layer: exact to the reference formula, runs everywhere, and is the only
path that trains (it is differentiable in latents, scales and input).

On CPU it computes in fp32 with the scales folded into two cached factors (two matmuls per call). The layer is
seen through its attributes only (``in_features``, ``is_trainable``, ``active_prefixes``, ``signs``,
``latent_signs``, ``folded_factors``, the scale tensors), so this module imports nothing of :mod:`hf_littlebit.nn`.
"""

from __future__ import annotations

from typing import Any

import torch


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow and inexact there); the input's dtype on accelerators."""
    if x.device.type == "cpu" or not x.dtype.is_floating_point:
        return torch.float32
    return x.dtype


def check_input_width(layer: Any, x: torch.Tensor) -> None:
    """The one check every backend makes before touching ``x``: its last dimension is the layer's ``in_features``."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"LittleBitLinear expects inputs with last dim {layer.in_features}, got {tuple(x.shape)}")


def torch_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``Y = ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h`` per path, summed, plus bias.

    Packed layers computing in fp32 (CPU) use their cached folded factors (the layer's ``folded_factors``: two
    matmuls per call). Half precision and trainable layers go path by path; trainable ones take the signs of
    their latents through the sign estimator, so that code is differentiable in latents, scales and input.
    """
    check_input_width(layer, x)
    dtype = compute_dtype_for(x)
    xs = x.reshape(-1, layer.in_features).to(dtype)
    if layer.is_trainable or dtype != torch.float32:
        # Half precision keeps the scales separate: folded products h·l could fall below fp16's normal range.
        y = None
        for prefix in layer.active_prefixes:
            out = path_forward(layer, prefix, xs, dtype)
            y = out if y is None else y + out
    else:
        a, b = layer.folded_factors(xs.device, dtype)  # scales folded into the ±1 factors, both paths side by side
        y = (xs @ a.T) @ b.T
    if layer.bias is not None:
        y = y + layer.bias.to(device=x.device, dtype=dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def path_forward(layer: Any, prefix: str, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One path's ``((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h`` on 2-D ``xs`` already in ``dtype``."""
    if layer.is_trainable:
        u, v = layer.latent_signs(prefix, dtype)
    else:
        u, v = layer.signs(prefix, xs.device, dtype)
    h, l, g = (getattr(layer, prefix + n).to(device=xs.device, dtype=dtype) for n in ("h", "l", "g"))  # noqa: E741
    z = ((xs * g) @ v.T) * l
    return (z @ u.T) * h
