"""The packed CPU backend: a packed layer computed from its sign words, with no per-layer dense copy.

* **Few tokens** (decode, ≤ :data:`KERNEL_MAX_TOKENS`): the C++ kernel ``kernels/littlebit/binary_lowrank_cpu.cpp``
  (AVX2 sign-bit XOR, several tokens per pass over the words, rows split across ``torch.get_num_threads()``
  threads). It reads 1 bit per sign where the dense fp32 cache reads 32.
* **More tokens** (prefill): signs are unpacked a tile of rows at a time into a small fp32 buffer and multiplied by
  a GEMM, so memory stays bounded by the tile, not the layer.

The same extension computes the tied LM head of a few-bit group-quantized embedding for few tokens
(:func:`group_head_forward`, ≤ :data:`GROUP_HEAD_MAX_TOKENS`), reading the packed codes in place.

The kernel is compiled once per machine on first use (``torch.utils.cpp_extension``, cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; ~1 minute). Without a compiler (or ``ninja``) the build
fails, one warning says so, and the backend answers unavailable: ``"auto"`` then uses the PyTorch path.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from . import tiled
from .reference import check_input_width

#: Up to this many tokens the C++ kernel runs; above it the tiled GEMM (the kernel's cost grows with the tokens,
#: a GEMM's barely does).
KERNEL_MAX_TOKENS = 16
#: Calls with fewer sign × token products run on one thread: a team's wake-up and barriers cost more (timed on
#: SmolLM2's 576-wide layer shapes, 2 cores: 576×192 at 0.55 bpw is faster on one thread, 576×576 on two).
MIN_PARALLEL_SIGNS = 1 << 17

#: Up to this many tokens a group-quantized tied head (``GroupQuantEmbedding.logits``) runs the kernel; above it the
#: embedding's chunked decode + GEMM, whose decoding cost is shared by all the tokens. On SmolLM2's 49,152 × 576 head
#: (1 thread) the kernel is ~3× faster at 64 tokens and the two meet near 128 (BENCHMARKS.md, issue 22).
GROUP_HEAD_MAX_TOKENS = 64
#: Group-head calls with fewer code × token products run on one thread (the binary kernel's limit; not tuned apart).
MIN_PARALLEL_CODES = 1 << 17

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "tried": False}


def _build_flags() -> list[str]:
    """``-fopenmp``: the kernel's OpenMP pragmas (and ``at::parallel_for``, a header template built on them) are
    ignored without it, and the kernel would run on one thread whatever ``torch.set_num_threads`` says."""
    capability = torch.backends.cpu.get_cpu_capability()
    # F16C (fp16 → fp32 conversion, for the group head's scales) comes with every AVX2 CPU
    simd = ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []
    return ["-O3", "-fopenmp", *simd]


def _already_built(name: str) -> bool:
    """Whether torch's extension cache holds a build of ``name`` (only to say that a first build takes a while)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 - a private helper of torch; if it moves, just say nothing
        return True


def load_kernel() -> Any | None:
    """The compiled extension, building it on the first call; ``None`` (after one warning) if it cannot be built."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("LITTLEBIT_CPU_KERNEL", "1") in ("0", ""):
            _state["tried"] = True  # switched off for the process: nothing is built, no warning
            return None
        try:
            from torch.utils.cpp_extension import load

            source = importlib.resources.files("hf_littlebit.kernels") / "binary_lowrank_cpu.cpp"
            flags = _build_flags()
            # The source's hash in the name: two installs (or checkouts) with different kernels never share a build.
            digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
            name = f"hf_littlebit_cpu_{'avx2' if '-mavx2' in flags else 'portable'}_{digest}"
            if not _already_built(name):
                logger.warning("hf_littlebit: building the packed CPU kernel for this machine (once, about a "
                               "minute; cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR)")
            _state["module"] = load(name=name, sources=[str(source)], extra_cflags=flags,
                                    extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure means: fall back, say why once
            warnings.warn(
                f"hf_littlebit: the packed CPU kernel could not be built ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); packed layers on CPU use the "
                "PyTorch path instead (fp32 factors cached per layer: more memory, slower). Install a C++ compiler "
                "and `pip install ninja` to enable it.",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["module"] = None
        _state["tried"] = True
    return _state["module"]


@torch.compiler.assume_constant_result
def cpu_kernel_available() -> bool:
    """True when the packed CPU kernel is (or can be) built. ``LITTLEBIT_CPU_KERNEL=0`` turns it off (read once, at
    the first use: the answer is asked for on every forward, where an environment lookup per layer would show)."""
    return load_kernel() is not None


def _unpack() -> tiled.Unpack:
    """The kernel's ±1 unpacking of a tile of sign rows when it is built, else (and under ``torch.compile``, which
    traces it) PyTorch's."""
    if torch.compiler.is_compiling():
        return tiled.unpack_fp32
    kernel = load_kernel()
    return kernel.unpack_signs_f32 if kernel is not None else tiled.unpack_fp32


def cpu_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``Y = Σ_paths ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h + bias`` from the packed words, computed in fp32, returned
    in ``x``'s dtype.

    Differentiable in ``x`` (the packed factors are frozen): adapters (PEFT LoRA) and gradient checkpointing train
    through packed layers, with the backward also reading the words tile by tile."""
    check_input_width(layer, x)
    xs = x.reshape(-1, layer.in_features)
    if torch.is_grad_enabled() and xs.requires_grad:
        y = _PackedLinear.apply(xs.float(), layer).to(x.dtype)
    else:
        y = _packed_forward(layer, xs)
    return y.reshape(*x.shape[:-1], layer.out_features)


@torch.library.custom_op("hf_littlebit::binary_lowrank_cpu", mutates_args=())
def _kernel_op(x: torch.Tensor, tensors: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel as an opaque op for ``torch.compile`` (eager calls go to the extension directly: no op dispatch
    per layer)."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("LittleBit backend 'cpu': the packed CPU kernel is not available (see the warning)")
    return kernel.binary_lowrank_forward(x, tensors, bias, MIN_PARALLEL_SIGNS)


@_kernel_op.register_fake
def _(x: torch.Tensor, tensors: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], tensors[1].shape[0]))


def _packed_forward(layer: Any, xs: torch.Tensor) -> torch.Tensor:
    """2-D ``xs`` of any float dtype → ``Y`` in the same dtype (computed in fp32)."""
    if xs.shape[0] <= KERNEL_MAX_TOKENS:
        if torch.compiler.is_compiling():
            return _kernel_op(xs, tiled.path_tensors(layer), layer.bias)
        kernel = load_kernel()
        if kernel is None:
            raise RuntimeError("LittleBit backend 'cpu': the packed CPU kernel is not available (see the warning)")
        return kernel.binary_lowrank_forward(xs, tiled.path_tensors(layer), layer.bias, MIN_PARALLEL_SIGNS)
    return tiled.layer_forward(layer, xs.float(), _unpack()).to(xs.dtype)


class _PackedLinear(torch.autograd.Function):
    """Gradient with respect to the input only: ``∂L/∂X = Σ_paths ((((∂L/∂Y ⊙ h) sgn(U)) ⊙ l) sgn(V)) ⊙ g``."""

    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, layer: Any) -> torch.Tensor:  # noqa: D102
        ctx.layer = layer
        return _packed_forward(layer, xs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return tiled.layer_input_grad(ctx.layer, grad.float(), _unpack()), None


# ---------------------------------------------------------------------------------------------- group-quantized head
def group_head_applies(embedding: Any, xs: torch.Tensor) -> bool:
    """Whether :func:`group_head_forward` serves this call: CPU tensors, no gradient asked for, at most
    :data:`GROUP_HEAD_MAX_TOKENS` tokens, and the kernel built (``LITTLEBIT_CPU_KERNEL=0`` turns it off)."""
    return (xs.device.type == "cpu" and embedding.codes.device.type == "cpu"
            and xs.shape[0] <= GROUP_HEAD_MAX_TOKENS
            and not (torch.is_grad_enabled() and xs.requires_grad)
            and cpu_kernel_available())


def group_head_forward(embedding: Any, xs: torch.Tensor) -> torch.Tensor:
    """``xs Êᵀ`` (2-D ``xs``, any float dtype, returned in it; computed in fp32) from a group-quantized embedding's
    ``codes``, ``scales`` and ``zeros``, never decoding more than one row at a time. Sees the embedding through those
    attributes and ``bits`` / ``group_size`` only."""
    args = (xs, embedding.codes, embedding.scales, embedding.zeros, embedding.bits, embedding.group_size)
    if torch.compiler.is_compiling():
        return _group_head_op(*args)
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the packed CPU kernel is not available (see the warning)")
    return kernel.group_head_forward(*args, MIN_PARALLEL_CODES)


@torch.library.custom_op("hf_littlebit::group_head_cpu", mutates_args=())
def _group_head_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int) -> torch.Tensor:
    """The group head as an opaque op for ``torch.compile`` (eager calls go to the extension directly)."""
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError("the packed CPU kernel is not available (see the warning)")
    return kernel.group_head_forward(x, codes, scales, zeros, bits, group_size, MIN_PARALLEL_CODES)


@_group_head_op.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
      group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))
