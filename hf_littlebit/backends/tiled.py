"""Packed-layer products computed from the sign words a tile of rows at a time, on any device.

A tile of sign rows is unpacked into a small fp32 buffer (:data:`TILE_BYTES`) and multiplied by a GEMM, so
the memory held never grows with the layer: the prefill path of the CPU backend, and the input gradient of packed
layers (adapters train through them) for the CPU and Triton backends. The layer is seen through its attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..format.packing import unpack_signs

#: Bytes of the fp32 buffer one unpacked tile of sign rows may take (a tile holds at least 8 rows, so only rows wider
#: than TILE_BYTES / 32 signs exceed it).
TILE_BYTES = 4 << 20


Unpack = Callable[[torch.Tensor, int], torch.Tensor]


def _tile_rows(width: int) -> int:
    return max(8, TILE_BYTES // (4 * width))


def unpack_fp32(bits: torch.Tensor, width: int) -> torch.Tensor:
    """±1.0 fp32 rows from packed rows, in PyTorch (any device)."""
    return unpack_signs(bits, width, torch.float32)


def product(v: torch.Tensor, bits: torch.Tensor, width: int, unpack: Unpack = unpack_fp32) -> torch.Tensor:
    """``v @ sgn(bits)ᵀ`` (``bits``: one packed row of ``width`` signs per output column), fp32. ``unpack`` turns a
    tile of packed rows into ±1.0 rows (a backend may pass a faster one)."""
    rows = bits.shape[0]
    tile = _tile_rows(width)
    out = v.new_empty(v.shape[0], rows)
    for start in range(0, rows, tile):
        signs = unpack(bits[start:start + tile], width)
        out[:, start:start + tile] = v @ signs.T
    return out


def transposed_product(v: torch.Tensor, bits: torch.Tensor, width: int, unpack: Unpack = unpack_fp32) -> torch.Tensor:
    """``v @ sgn(bits)`` (``v`` has one column per packed row), fp32."""
    tile = _tile_rows(width)
    out = v.new_zeros(v.shape[0], width)
    for start in range(0, bits.shape[0], tile):
        signs = unpack(bits[start:start + tile], width)
        out.addmm_(v[:, start:start + tile], signs)
    return out


def _scales(layer: Any, prefix: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(getattr(layer, prefix + n).to(device=device, dtype=torch.float32) for n in ("h", "l", "g"))


def layer_forward(layer: Any, xs: torch.Tensor, unpack: Unpack = unpack_fp32) -> torch.Tensor:
    """``Σ_paths ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h + bias`` on 2-D fp32 ``xs``: two tiled GEMMs per path."""
    y = None
    for prefix in layer.active_prefixes:
        h, l, g = _scales(layer, prefix, xs.device)  # noqa: E741
        t = product(xs * g, getattr(layer, prefix + "v_bits"), layer.in_features, unpack) * l
        out = product(t, getattr(layer, prefix + "u_bits"), layer.rank, unpack) * h
        y = out if y is None else y + out
    if layer.bias is not None:
        y = y + layer.bias.to(device=xs.device, dtype=torch.float32)
    return y


def paths_input_grad(paths: list[tuple[torch.Tensor, ...]], grad: torch.Tensor, d_in: int,
                     unpack: Unpack = unpack_fp32) -> torch.Tensor:
    """``∂L/∂X = Σ_paths ((((∂L/∂Y ⊙ h) sgn(U)) ⊙ l) sgn(V)) ⊙ g`` for 2-D fp32 ``grad``; ``paths`` holds
    ``(v_bits, u_bits, h, l, g)`` per path (the packed factors are frozen: no gradient for them)."""
    total = None
    for v_bits, u_bits, h, l, g in paths:  # noqa: E741
        h, l, g = (t.reshape(-1).to(device=grad.device, dtype=torch.float32) for t in (h, l, g))  # noqa: E741
        gt = transposed_product(grad * h, u_bits, v_bits.shape[0], unpack) * l
        gx = transposed_product(gt, v_bits, d_in, unpack) * g
        total = gx if total is None else total + gx
    return total


PATH_ORDER = ("v_bits", "u_bits", "h", "l", "g")


def path_tensors(layer: Any) -> list[torch.Tensor]:
    """The active paths' tensors in :data:`PATH_ORDER`, flat (the CPU kernel's argument list)."""
    params = layer._parameters  # a dict lookup: nn.Module.__getattr__ costs microseconds per name, per call
    return [params[prefix + name] for prefix in layer.active_prefixes for name in PATH_ORDER]


def layer_input_grad(layer: Any, grad: torch.Tensor, unpack: Unpack = unpack_fp32) -> torch.Tensor:
    """:func:`paths_input_grad` of a packed layer's active paths."""
    flat = path_tensors(layer)
    paths = [tuple(flat[i:i + len(PATH_ORDER)]) for i in range(0, len(flat), len(PATH_ORDER))]
    return paths_input_grad(paths, grad, layer.in_features, unpack)
