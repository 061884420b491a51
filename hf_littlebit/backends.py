"""Forward implementations of :class:`~hf_littlebit.layer.LittleBitLinear` and the choice between them.

* ``"torch"``: plain PyTorch, exact to the reference formula, runs everywhere (and is the only path that trains).
  On CPU it computes in fp32 with the ±1 factors unpacked once and cached.
* ``"triton"``: the fused kernels of :mod:`hf_littlebit.kernels.binary_lowrank`, which read the packed words
  directly (16–150× fewer weight bytes than fp16) — for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (tests).

The choice per call (:func:`select_backend`): ``$LITTLEBIT_BACKEND`` if set (an override for a whole process),
else the layer's ``backend`` (from ``LittleBitConfig(backend=...)``), else ``"auto"`` = Triton for CUDA tensors
when Triton is importable, PyTorch otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .kernels import interpreter_enabled, triton_available

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

    Packed layers computing in fp32 (CPU) use their cached folded factors (:meth:`LittleBitLinear.folded_factors`:
    two matmuls per call). Half precision and trainable layers go path by path; trainable ones take the signs of
    their latents through the sign estimator, so that code is differentiable in latents, scales and input.
    """
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"LittleBitLinear expects inputs with last dim {layer.in_features}, got {tuple(x.shape)}")
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


def path_forward(layer: LittleBitLinear, prefix: str, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One path's ``((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h`` on 2-D ``xs`` already in ``dtype``."""
    if layer.is_trainable:
        u, v = layer.latent_signs(prefix, dtype)
    else:
        u, v = layer.signs(prefix, xs.device, dtype)
    h, l, g = (getattr(layer, prefix + n).to(device=xs.device, dtype=dtype) for n in ("h", "l", "g"))  # noqa: E741
    z = ((xs * g) @ v.T) * l
    return (z @ u.T) * h


def triton_forward(layer: LittleBitLinear, x: torch.Tensor) -> torch.Tensor:
    """The fused Triton kernels (custom op ``torch.ops.hf_littlebit.binary_lowrank_linear``) on the packed words."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"LittleBitLinear expects inputs with last dim {layer.in_features}, got {tuple(x.shape)}")
    from .kernels import binary_lowrank  # noqa: F401  (imported on first use: registers the custom op)

    res = layer.residual and layer.residual_enabled
    tensors = [getattr(layer, name) for name in ("v_bits", "g", "l", "u_bits", "h")]
    tensors += [getattr(layer, "res_" + name) for name in ("v_bits", "g", "l", "u_bits", "h")] if res else [None] * 5
    xs = x.reshape(-1, layer.in_features)
    if xs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        xs = xs.float()
    y = torch.ops.hf_littlebit.binary_lowrank_linear(xs, *tensors, layer.bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


BACKENDS: dict[str, Callable[[LittleBitLinear, torch.Tensor], torch.Tensor]] = {
    "torch": torch_forward,
    "triton": triton_forward,
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def check_backend_name(choice: str, source: str) -> str:
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{source}: unknown LittleBit backend {choice!r}; choose one of {list(BACKEND_CHOICES)}")
    return choice


def select_backend(layer: LittleBitLinear, x: torch.Tensor) -> str:
    """Backend for this call: ``$LITTLEBIT_BACKEND`` if set, else the layer's choice, else ``"auto"``."""
    env = os.environ.get(ENV_BACKEND)
    choice = check_backend_name(env, f"${ENV_BACKEND}") if env else (layer.backend or "auto")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton" and not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "LittleBit backend 'triton' runs on CUDA tensors only (CPU tensors only under TRITON_INTERPRET=1, for "
            f"tests); this input is on {x.device}. Use backend='auto' or 'torch', or unset ${ENV_BACKEND}."
        )
    if choice == "triton" and not triton_available():
        raise RuntimeError("LittleBit backend 'triton' needs the triton package: pip install 'hf-littlebit[gpu]'")
    return choice


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Set the backend of every LittleBit layer of ``model`` (``"auto"``, ``"torch"`` or ``"triton"``); returns
    how many layers were changed. ``$LITTLEBIT_BACKEND`` still overrides it."""
    from .layer import LittleBitLinear

    check_backend_name(backend, "set_backend")
    layers = [m for m in model.modules() if isinstance(m, LittleBitLinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


def littlebit_forward(layer: LittleBitLinear, x: torch.Tensor) -> torch.Tensor:
    if layer.is_trainable:  # fast kernels serve packed layers only
        return torch_forward(layer, x)
    return BACKENDS[select_backend(layer, x)](layer, x)
