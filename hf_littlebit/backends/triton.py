"""Glue to the fused Triton kernels (:mod:`hf_littlebit.kernels.binary_lowrank`, shipped from the repository's
top-level ``kernels/`` folder): availability checks and the call of the custom op on a layer's packed words.

Triton is optional; the kernel module is imported only on first use, so ``import hf_littlebit`` never pays for
Triton, and ``TRITON_INTERPRET`` (read when kernels are decorated) can still be set before then.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU to run on)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The fused Triton kernels (custom op ``torch.ops.hf_littlebit.binary_lowrank_linear``) on the packed words."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"LittleBitLinear expects inputs with last dim {layer.in_features}, got {tuple(x.shape)}")
    from ..kernels import binary_lowrank  # noqa: F401  (imported on first use: registers the custom op)

    res = layer.residual and layer.residual_enabled
    tensors = [getattr(layer, name) for name in ("v_bits", "g", "l", "u_bits", "h")]
    tensors += [getattr(layer, "res_" + name) for name in ("v_bits", "g", "l", "u_bits", "h")] if res else [None] * 5
    xs = x.reshape(-1, layer.in_features)
    if xs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        xs = xs.float()
    y = torch.ops.hf_littlebit.binary_lowrank_linear(xs, *tensors, layer.bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
