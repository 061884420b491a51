"""Which forward a packed layer runs, chosen per call.

* ``"cpu"``: :mod:`hf_littlebit.backends.cpu`, computed from the packed sign words on CPU (C++ kernel for decode,
  tile-by-tile GEMM for prefill): no per-layer dense copy. The ``"auto"`` choice for CPU tensors.
* ``"torch"``: :mod:`hf_littlebit.backends.reference`, plain PyTorch, everywhere, and the only path that trains the
  factors themselves (latents, scales); ``"cpu"`` and ``"triton"`` give the input gradient, so adapters train
  through packed layers.
  On CPU it keeps two fp32 factors per layer with the scales folded in (32·bpw bits per weight, more than the fp16
  model below ~0.5 bpw): the explicit opt-in that trades memory for simplicity, and the fallback without a compiler.
* ``"triton"``: :mod:`hf_littlebit.backends.triton`, the fused kernels that read the packed words directly (16–150×
  fewer weight bytes than fp16): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). The ``"auto"``
  choice for CUDA tensors when Triton is installed.

The choice (:func:`select_backend`): ``$LITTLEBIT_BACKEND`` if set (an override for a whole process), else the
layer's ``backend`` attribute (from ``LittleBitConfig(backend=...)`` or ``hf_littlebit.set_backend``), else
``"auto"``. The layer is seen through its attributes only; :mod:`hf_littlebit.nn.layer` imports this module, never
the other way round.

A group-quantized tied head (:class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding`, no ``backend``
attribute) asks :func:`group_head_kernel` instead: a packed kernel when one serves the call (few tokens, no
gradient), else ``None`` and it decodes the vocabulary a chunk at a time in PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .cpu import cpu_forward, cpu_kernel_available, group_head_applies, group_head_forward
from .reference import torch_forward
from .triton import (
    group_head_triton_applies,
    interpreter_enabled,
    triton_available,
    triton_forward,
    triton_group_head,
)

ENV_BACKEND = "LITTLEBIT_BACKEND"

BACKENDS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "torch": torch_forward,
    "triton": triton_forward,
    "cpu": cpu_forward,
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def check_backend_name(choice: str, source: str) -> str:
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{source}: unknown LittleBit backend {choice!r}; choose one of {list(BACKEND_CHOICES)}")
    return choice


def select_backend(layer: Any, x: torch.Tensor) -> str:
    """Backend for this call: ``$LITTLEBIT_BACKEND`` if set, else the layer's choice, else ``"auto"``."""
    env = os.environ.get(ENV_BACKEND)
    choice = check_backend_name(env, f"${ENV_BACKEND}") if env else (layer.backend or "auto")
    if choice == "auto":
        if x.is_cuda:
            return "triton" if triton_available() else "torch"
        return "cpu" if x.device.type == "cpu" and cpu_kernel_available() else "torch"
    if choice == "cpu" and x.device.type != "cpu":
        raise RuntimeError(f"LittleBit backend 'cpu' runs on CPU tensors; this input is on {x.device}. Use 'auto'.")
    if choice == "cpu" and not cpu_kernel_available():
        raise RuntimeError("LittleBit backend 'cpu': the packed CPU kernel is not available (see the warning about "
                           "its build); use backend='auto' or 'torch'")
    if choice == "triton" and not x.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "LittleBit backend 'triton' runs on CUDA tensors only (CPU tensors only under TRITON_INTERPRET=1, for "
            f"tests); this input is on {x.device}. Use backend='auto' or 'torch', or unset ${ENV_BACKEND}."
        )
    if choice == "triton" and not triton_available():
        raise RuntimeError("LittleBit backend 'triton' needs the triton package: pip install 'hf-littlebit[gpu]'")
    return choice


def _trains_own_tensors(layer: Any) -> bool:
    """A packed layer whose bias or scales ask for a gradient: the fast kernels give the input gradient only."""
    params = layer._parameters
    return any(p is not None and p.requires_grad for p in params.values())


def littlebit_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    # Trainable layers, and packed layers whose own tensors train, need the reference path's full autograd.
    if layer.is_trainable or (torch.is_grad_enabled() and _trains_own_tensors(layer)):
        return torch_forward(layer, x)
    return BACKENDS[select_backend(layer, x)](layer, x)


GroupHeadForward = Callable[[Any, torch.Tensor], torch.Tensor]


def group_head_kernel(embedding: Any, xs: torch.Tensor) -> GroupHeadForward | None:
    """The packed kernel that computes ``xs Êᵀ`` of a group-quantized embedding in this call, or ``None`` for the
    chunked PyTorch path: the CPU kernel for CPU tensors (``LITTLEBIT_CPU_KERNEL=0`` turns it off), the Triton one
    for CUDA tensors, each for few tokens without gradient. ``$LITTLEBIT_BACKEND`` narrows the choice as for the
    layers: ``torch`` takes the PyTorch path, ``cpu`` / ``triton`` only that kernel (``triton`` also on CPU tensors
    under ``TRITON_INTERPRET=1``)."""
    env = os.environ.get(ENV_BACKEND)
    choice = check_backend_name(env, f"${ENV_BACKEND}") if env else "auto"
    if choice in ("auto", "cpu") and group_head_applies(embedding, xs):
        return group_head_forward
    if choice in ("auto", "triton") and group_head_triton_applies(embedding, xs, explicit=choice == "triton"):
        return triton_group_head
    return None
