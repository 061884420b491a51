"""Glue to the fused Triton kernels (:mod:`hf_littlebit.kernels.binary_lowrank`, shipped from the repository's
top-level ``kernels/`` folder): availability checks, the op's gradient, and the call of the custom op on a layer's
packed words.

Triton is optional; the kernel module is imported only on first use (:func:`load_kernels`), so
``import hf_littlebit`` never pays for Triton, and ``TRITON_INTERPRET`` (read when kernels are decorated) can still be
set before then.

**Gradient.** :func:`load_kernels` registers the op's autograd formula (the kernels package imports nothing of
hf_littlebit, so it cannot do it itself): the gradient with respect to the input,
``∂L/∂X = Σ_paths ((((∂L/∂Y ⊙ h) sgn(U)) ⊙ l) sgn(V)) ⊙ g``, computed in fp32 by unpacking the sign words a tile of
rows at a time (:mod:`hf_littlebit.backends.tiled`), so memory stays bounded by the tile. The packed factors, scales
and bias are frozen in a packed layer and get no gradient; asking for one is an error (train them on the ``torch``
backend). This is what lets PEFT adapters, gradient checkpointing and ``torch.compile`` train through packed layers on
the Triton backend.

**Split-K.** The decode kernels split stage 1 over ``d_in``; the count is chosen from the GPU's size unless the layer
has a ``split_k`` attribute (a positive int) or ``$LITTLEBIT_SPLIT_K`` is set (the layer's attribute wins). Any
count gives bitwise reproducible results; different counts differ only by fp32 rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from . import tiled
from .reference import check_input_width

ENV_SPLIT_K = "LITTLEBIT_SPLIT_K"

#: Positions of the op's tensor arguments, per path: (v_bits, g, l, u_bits, h).
_PATH_ARGS = ((1, 2, 3, 4, 5), (6, 7, 8, 9, 10))
_N_OP_ARGS = 14


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU to run on)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def load_kernels() -> ModuleType:
    """The kernel module, imported (which registers the custom op) and given its autograd formula, once."""
    from ..kernels import binary_lowrank

    torch.library.register_autograd(binary_lowrank.OP_NAME, _backward, setup_context=_setup_context)
    return binary_lowrank


@torch.compiler.assume_constant_result
def _kernels_ready() -> bool:
    """:func:`load_kernels` for the forward: ``torch.compile`` runs it once while tracing instead of tracing into
    the registration (the first call of a model may well be a compiled one)."""
    load_kernels()
    return True


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    """Keep what the input gradient needs: the packed words and scales of each path, and the input's dtype."""
    x = inputs[0]
    ctx.x_dtype, ctx.d_in = x.dtype, x.shape[1]
    ctx.save_for_backward(*(inputs[i] for idx in _PATH_ARGS if inputs[idx[0]] is not None for i in idx))


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    """``∂L/∂X`` through both stages of every path; ``None`` for the frozen packed factors, scales and bias."""
    if any(ctx.needs_input_grad[1:]):
        raise RuntimeError("LittleBit backend 'triton' computes the gradient of the input only: the packed factors, "
                           "scales and bias of a packed layer are frozen. Train them with backend='torch'.")
    saved = ctx.saved_tensors
    paths = [(v_bits, u_bits, h, l, g) for v_bits, g, l, u_bits, h in  # noqa: E741
             (saved[i:i + 5] for i in range(0, len(saved), 5))]
    total = tiled.paths_input_grad(paths, grad.float(), ctx.d_in)
    return (total.to(ctx.x_dtype),) + (None,) * (_N_OP_ARGS - 1)


def split_k_for(layer: Any) -> int:
    """Splits of the decode kernels' stage 1: the layer's ``split_k``, else ``$LITTLEBIT_SPLIT_K``, else 0 (auto)."""
    value = getattr(layer, "split_k", None)
    if value is None:
        value = os.environ.get(ENV_SPLIT_K) or 0
    try:
        splits = int(value)
    except ValueError:
        raise ValueError(f"LittleBit split_k must be a non-negative integer, got {value!r}") from None
    if splits < 0:
        raise ValueError(f"LittleBit split_k must be a non-negative integer (0 = automatic), got {splits}")
    return splits


def triton_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The fused Triton kernels (custom op ``torch.ops.hf_littlebit.binary_lowrank_linear``) on the packed words;
    differentiable in ``x``."""
    check_input_width(layer, x)
    _kernels_ready()
    res = layer.residual and layer.residual_enabled
    tensors = [getattr(layer, name) for name in ("v_bits", "g", "l", "u_bits", "h")]
    tensors += [getattr(layer, "res_" + name) for name in ("v_bits", "g", "l", "u_bits", "h")] if res else [None] * 5
    xs = x.reshape(-1, layer.in_features)
    if xs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        xs = xs.float()
    y = torch.ops.hf_littlebit.binary_lowrank_linear(xs, *tensors, layer.bias, split_k_for(layer))
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


# ---------------------------------------------------------------------------------------------- group-quantized head
#: Most tokens the Triton group head takes per call (generation); more go to the chunked decode + GEMM.
TRITON_GROUP_HEAD_MAX_TOKENS = 16


def group_head_triton_applies(embedding: Any, xs: torch.Tensor, explicit: bool = False) -> bool:
    """Whether :func:`triton_group_head` can serve this call: Triton installed, no gradient asked for, at most
    :data:`TRITON_GROUP_HEAD_MAX_TOKENS` tokens, and CUDA tensors — or, when ``explicit`` (``$LITTLEBIT_BACKEND=
    triton``), CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    on_device = xs.is_cuda or (explicit and interpreter_enabled() and xs.device.type == "cpu")
    return (on_device and embedding.codes.device == xs.device and xs.shape[0] <= TRITON_GROUP_HEAD_MAX_TOKENS
            and not (torch.is_grad_enabled() and xs.requires_grad) and triton_available())


@functools.cache
def _group_head_kernels() -> ModuleType:
    from ..kernels import group_head

    return group_head


@torch.compiler.assume_constant_result
def _group_head_ready() -> bool:
    """:func:`_group_head_kernels` for the forward, run once while ``torch.compile`` traces (as
    :func:`_kernels_ready`)."""
    _group_head_kernels()
    return True


def triton_group_head(embedding: Any, xs: torch.Tensor) -> torch.Tensor:
    """``xs Êᵀ`` of a group-quantized embedding from its packed ``codes``, ``scales`` and ``zeros`` (custom op
    ``torch.ops.hf_littlebit.group_head``); no gradient. Sees the embedding through those attributes and ``bits`` /
    ``group_size`` only."""
    _group_head_ready()
    if xs.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        xs = xs.float()
    return torch.ops.hf_littlebit.group_head(xs, embedding.codes, embedding.scales, embedding.zeros, embedding.bits,
                                             embedding.group_size)
