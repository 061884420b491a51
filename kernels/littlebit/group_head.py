"""Triton decode kernel of the group-quantized tied LM head: ``Y = X Êᵀ`` read straight from the packed codes.

``Ê`` is a :class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding`'s matrix in its checkpoint format, used
as it is: ``codes`` (vocab, ⌈hidden · bits / 32⌉) int32, each row one LSB-first bit stream of ``bits``-bit codes
(a code may straddle two words when 32 is not a multiple of ``bits``), ``scales`` and ``zeros`` (vocab, groups) in
any float dtype; entry ``d`` of row ``v`` is ``zeros[v, d // group] + scales[v, d // group] · code``.

For token-by-token generation the head is a GEMV over the largest matrix of a small model (SmolLM2: 49,152 × 576):
the PyTorch path decodes the vocabulary a chunk at a time into fp32 (8 bytes written and read per entry for a
0.4–0.6-byte code), this kernel reads each code word once. Each program takes ``BLOCK_V`` vocabulary rows and up to
``BLOCK_M`` tokens, decodes a ``BLOCK_V × BLOCK_D`` tile in registers (shift, mask, one fused multiply-add with the
group's scale and zero) and accumulates the products element-wise in fp32, reducing once at the end (the same shape
as the binary layers' GEMV, :mod:`.triton_gemv`). Everything is computed in fp32; the output is stored in ``x``'s
dtype. Larger batches are left to the caller (a chunked decode feeding cuBLAS does better there).

:func:`group_head` is registered as the custom op ``torch.ops.hf_littlebit.group_head`` with a fake implementation,
so ``torch.compile`` treats it as one opaque op. With ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .binary_lowrank import _next_pow2, launch_guard

#: Most tokens of one program (more tokens: more programs, each decoding its tiles again).
MAX_BLOCK_M = 16
#: Target size of a program's accumulator (tokens × rows × entries; 8,192 at 16 tokens, where BLOCK_D stops at 16).
TILE_ELEMS = 4096
BLOCK_V = 32

OP_NAME = "hf_littlebit::group_head"


@triton.jit
def _group_head_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, y_ptr,
    M, V, D, stride_xm, stride_c, stride_s, stride_z, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``y[m, v] = Σ_d x[m, d] · (zeros[v, d // GROUP] + scales[v, d // GROUP] · code[v, d])``; grid (⌈V/BLOCK_V⌉,
    ⌈M/BLOCK_M⌉)."""
    pid_v = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    rows_v = offs_v.to(tl.int64)[:, None]
    rows_c = rows_v * stride_c
    acc = tl.zeros((BLOCK_M, BLOCK_V, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        tile_mask = mask_v[:, None] & mask_d[None, :]
        bit = offs_d * BITS
        word = bit // 32
        off = bit % 32
        low = tl.load(codes_ptr + rows_c + word[None, :], mask=tile_mask, other=0)
        code = low >> off[None, :]  # arithmetic shift: the bits above a straddling code's first part are sign copies
        if 32 % BITS != 0:
            straddle = (off + BITS) > 32
            kept = tl.where(straddle, 32 - off, BITS)  # bits of the code in its first word (every shift stays < 32)
            high = tl.load(codes_ptr + rows_c + word[None, :] + 1, mask=tile_mask & straddle[None, :], other=0)
            code = (code & ((1 << kept[None, :]) - 1)) | (high << kept[None, :])
        code = code & ((1 << BITS) - 1)
        group = offs_d // GROUP
        scale = tl.load(scales_ptr + rows_v * stride_s + group[None, :], mask=tile_mask, other=0.0)
        zero = tl.load(zeros_ptr + rows_v * stride_z + group[None, :], mask=tile_mask, other=0.0)
        w = zero.to(tl.float32) + scale.to(tl.float32) * code.to(tl.float32)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_v[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_v[None, :])


def _check(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
           group_size: int) -> None:
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"group_head: x must be a 2-D float tensor (tokens, hidden), got {x.dtype} {tuple(x.shape)}")
    if not 1 <= bits <= 8 or group_size < 1:
        raise ValueError(f"group_head: bits must be 1–8 and group_size ≥ 1, got {bits} and {group_size}")
    d = x.shape[1]
    groups = (d + group_size - 1) // group_size
    if codes.dtype != torch.int32 or codes.dim() != 2 or codes.shape[1] != (d * bits + 31) // 32:
        raise ValueError(f"group_head: codes must be int32 (vocab, {(d * bits + 31) // 32}) for {d} entries of "
                         f"{bits} bits, got {codes.dtype} {tuple(codes.shape)}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (codes.shape[0], groups) or not t.dtype.is_floating_point:
            raise ValueError(f"group_head: {name} must be float ({codes.shape[0]}, {groups}), got {t.dtype} "
                             f"{tuple(t.shape)}")
    for name, t in (("codes", codes), ("scales", scales), ("zeros", zeros)):
        if t.device != x.device:
            raise ValueError(f"group_head: {name} is on {t.device}, x on {x.device}")
        if t.stride(1) != 1:
            raise ValueError(f"group_head: {name} must be contiguous along its rows")


@torch.library.custom_op(OP_NAME, mutates_args=())
def group_head(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """``x Êᵀ`` (tokens × vocab, in ``x``'s dtype; fp32 inside) from the packed codes, scales and zeros (module
    docstring). Any number of tokens works; it is built for few (generation)."""
    _check(x, codes, scales, zeros, bits, group_size)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, d = x.shape
    vocab = codes.shape[0]
    y = torch.empty((m, vocab), device=x.device, dtype=x.dtype)
    if m == 0 or vocab == 0:
        return y
    block_m = min(_next_pow2(m), MAX_BLOCK_M)
    block_d = max(16, min(_next_pow2(d), TILE_ELEMS // (block_m * BLOCK_V)))
    grid = (triton.cdiv(vocab, BLOCK_V), triton.cdiv(m, block_m))
    with launch_guard(x):
        _group_head_kernel[grid](
            x, codes, scales, zeros, y, m, vocab, d, x.stride(0), codes.stride(0), scales.stride(0),
            zeros.stride(0), y.stride(0), BITS=bits, GROUP=group_size, BLOCK_M=block_m, BLOCK_V=BLOCK_V,
            BLOCK_D=block_d,
        )
    return y


@group_head.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
      group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))
