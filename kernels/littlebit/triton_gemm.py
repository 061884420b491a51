"""Triton prefill kernels (``tl.dot`` GEMMs, many tokens) of the packed binary low-rank layer: ±1 operand tiles
unpacked in registers, fp16 operands rescaled row by row by exact powers of two so nothing overflows, bf16 on bf16
tensor cores, fp32 accumulation. See :mod:`hf_littlebit.kernels.binary_lowrank`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _epilogue

#: ``DOT`` constexpr of the prefill kernels: which operands ``tl.dot`` gets.
DOT_FP32, DOT_FP16, DOT_BF16 = 0, 1, 2


@triton.jit
def _signs(words, shift):
    """±1.0 (fp32) from int32 words and per-element bit positions (bit 1 means −1; arithmetic shift, then & 1)."""
    return 1.0 - 2.0 * ((words >> shift) & 1).to(tl.float32)


@triton.jit
def _pow2_row_scales(a):
    """Per row of ``a``: ``2^(14 − e)`` and its inverse, ``e`` the exponent of the row's largest magnitude, so the
    scaled row peaks in [2¹⁴, 2¹⁵) (fits fp16 with room for rounding). Built from exponent bits, hence exact;
    clamped to normal fp32 (all-zero rows get 2¹²⁶, inf/nan rows keep inf/nan)."""
    amax = tl.max(tl.abs(a), axis=1)
    exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.minimum(tl.maximum(268 - exponent, 1), 253)
    return (biased << 23).to(tl.float32, bitcast=True), ((254 - biased) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, s, DOT: tl.constexpr):
    """fp32-accumulated ``a @ s`` (``s`` is ±1): see the module docstring for the operand policy per ``DOT``."""
    if DOT == 1:
        scale, inv = _pow2_row_scales(a)
        out = tl.dot((a * scale[:, None]).to(tl.float16), s.to(tl.float16)) * inv[:, None]
    elif DOT == 2:
        out = tl.dot(a.to(tl.bfloat16), s.to(tl.bfloat16))
    else:
        out = tl.dot(a, s, input_precision="ieee")
    return out


@triton.jit
def _gemm_stage1(
    x_ptr, v_ptr, g_ptr, rv_ptr, rg_ptr, t_ptr,
    M, K, R, stride_xm, stride_v, stride_rv, path_stride,
    HAS_RES: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[p] = (X ⊙ g[p]) S_V[p]ᵀ for one (BLOCK_M × BLOCK_R) tile; grid (⌈M/BLOCK_M⌉, ⌈r/BLOCK_R⌉)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # (BLOCK_K, BLOCK_R) tile of S_Vᵀ: element (k, j) is bit k % 32 of word (j, k // 32).
        words = offs_r[None, :] * stride_v + (offs_k // 32)[:, None]
        word_mask = mask_k[:, None] & mask_r[None, :]
        shift = (offs_k % 32)[:, None]
        s = _signs(tl.load(v_ptr + words, mask=word_mask, other=0), shift)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += _dot(x * g[None, :], s, DOT)
        if HAS_RES:
            words_res = offs_r[None, :] * stride_rv + (offs_k // 32)[:, None]
            s_res = _signs(tl.load(rv_ptr + words_res, mask=word_mask, other=0), shift)
            g_res = tl.load(rg_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc_res += _dot(x * g_res[None, :], s_res, DOT)
    t_ptrs = t_ptr + rows * R + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(t_ptrs, acc, mask=t_mask)
    if HAS_RES:
        tl.store(t_ptrs + path_stride, acc_res, mask=t_mask)


@triton.jit
def _gemm_stage2(
    t_ptr, u_ptr, l_ptr, h_ptr, ru_ptr, rl_ptr, rh_ptr, b_ptr, y_ptr,
    M, N, R, stride_u, stride_ru, stride_ym, path_stride,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Y tile = Σ_p ((t[p] ⊙ l[p]) S_U[p]ᵀ) ⊙ h[p] (+ bias); grid (⌈M/BLOCK_M⌉, ⌈d_out/BLOCK_N⌉)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < R
        t_ptrs = t_ptr + rows * R + offs_j[None, :]
        t_mask = mask_m[:, None] & mask_j[None, :]
        # (BLOCK_J, BLOCK_N) tile of S_Uᵀ: element (j, n) is bit j % 32 of word (n, j // 32).
        word_mask = mask_j[:, None] & mask_n[None, :]
        shift = (offs_j % 32)[:, None]
        tl_ = tl.load(t_ptrs, mask=t_mask, other=0.0) * tl.load(l_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        s = _signs(tl.load(u_ptr + offs_n[None, :] * stride_u + (offs_j // 32)[:, None], mask=word_mask, other=0),
                   shift)
        acc += _dot(tl_, s, DOT)
        if HAS_RES:
            tl_res = tl.load(t_ptrs + path_stride, mask=t_mask, other=0.0) * tl.load(
                rl_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            s_res = _signs(tl.load(ru_ptr + offs_n[None, :] * stride_ru + (offs_j // 32)[:, None], mask=word_mask,
                                   other=0), shift)
            acc_res += _dot(tl_res, s_res, DOT)
    _epilogue(acc, acc_res, h_ptr, rh_ptr, b_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym,
              HAS_RES, HAS_BIAS)
