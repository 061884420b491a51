"""Triton decode kernels (GEMV, few tokens) of the packed binary low-rank layer, shaped for memory bandwidth.

Each program loads a tile of sign words once, expands each word's 32 bits in registers and applies a sign by moving
the bit to bit 31 and XOR-ing it into the fp32 activation; partial terms accumulate element-wise across the loop and
are reduced once at the end. Stage 1 is split over ``d_in``; each split stores its partial latent in its own slice
and stage 2 sums the slices in a fixed order (no atomics). See :mod:`hf_littlebit.kernels.binary_lowrank`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import INTERPRET, _epilogue

#: Upper bound on the elements of a decode program's accumulator (tokens × rows × word lanes), per path.
GEMV_TILE_ELEMS = 4096


def _gemv_configs() -> list[triton.Config]:
    """A small tuning set for the GEMVs (``BLOCK_N`` rows of sign words per program); one config under the
    interpreter, where multi-config autotuning would ask for a GPU to time on."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w) for n, w in ((16, 4), (32, 4), (32, 8), (64, 8))]


def _words_per_step(args: dict) -> int:
    """Words per row a GEMV program expands per loop step: as many as keep its accumulator within
    :data:`GEMV_TILE_ELEMS` (tokens × rows × 32 lanes × words)."""
    return max(1, GEMV_TILE_ELEMS // (args["BLOCK_M"] * args["BLOCK_N"] * 32))


@triton.jit
def _signed_terms(vals, words):
    """``vals[m, w, b]`` (fp32) with its sign flipped where bit ``b`` of ``words[n, w]`` is 1 → (M, N, W, 32) fp32.

    The bit is moved to bit 31 (shift left, arithmetic shift right, shift left) and XORed into the float's bits:
    each word is loaded once and expanded in registers, with no int→float conversion and no multiply."""
    lane = tl.arange(0, 32)
    flip = ((words[:, :, None] << (31 - lane)[None, None, :]) >> 31) << 31
    bits = vals.to(tl.int32, bitcast=True)
    return (bits[:, None, :, :] ^ flip[None, :, :, :]).to(tl.float32, bitcast=True)


@triton.jit
def _word_lanes(w0, BLOCK_W: tl.constexpr):
    """Word indices (BLOCK_W,) from ``w0`` and the element index (BLOCK_W, 32) of every bit of those words."""
    offs_w = w0 + tl.arange(0, BLOCK_W)
    return offs_w, offs_w[:, None] * 32 + tl.arange(0, 32)[None, :]


@triton.autotune(configs=_gemv_configs(), key=["BLOCK_M", "R", "KW"])
@triton.heuristics({"BLOCK_W": _words_per_step})
@triton.jit
def _gemv_stage1(
    x_ptr, v_ptr, g_ptr, rv_ptr, rg_ptr, t_ptr,
    M, K, R, KW, stride_xm, stride_v, stride_rv, W_PER_SPLIT, path_stride, split_stride,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Partial ``t[split, p, m, j] = Σ_k S_V[p][j, k] · x[m, k] · g[p][k]`` over one split of the words of ``d_in``;
    grid (⌈r/BLOCK_N⌉, splits). Every split stores its own slice (no atomics)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W, 32), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W, 32), dtype=tl.float32)
    w_lo = pid_k * W_PER_SPLIT
    w_hi = tl.minimum(w_lo + W_PER_SPLIT, KW)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        offs_w, offs_k = _word_lanes(w0, BLOCK_W)
        mask_w = offs_w < w_hi
        mask_k = mask_w[:, None] & (offs_k < K)
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, :, :],
                    mask=mask_m[:, None, None] & mask_k[None, :, :], other=0.0).to(tl.float32)
        word_mask = mask_r[:, None] & mask_w[None, :]
        words = tl.load(v_ptr + offs_r[:, None] * stride_v + offs_w[None, :], mask=word_mask, other=0)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += _signed_terms(x * g[None, :, :], words)
        if HAS_RES:
            words_res = tl.load(rv_ptr + offs_r[:, None] * stride_rv + offs_w[None, :], mask=word_mask, other=0)
            g_res = tl.load(rg_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc_res += _signed_terms(x * g_res[None, :, :], words_res)
    t_ptrs = t_ptr + pid_k * split_stride + offs_m[:, None] * R + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(t_ptrs, tl.sum(tl.sum(acc, axis=3), axis=2), mask=t_mask)
    if HAS_RES:
        tl.store(t_ptrs + path_stride, tl.sum(tl.sum(acc_res, axis=3), axis=2), mask=t_mask)


@triton.jit
def _latent(t_ptrs, mask, SPLITS, split_stride):
    """The latent tile at ``t_ptrs``: the sum of the splits' partial slices, always in the same order."""
    t = tl.load(t_ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLITS):
        t_ptrs += split_stride
        t += tl.load(t_ptrs, mask=mask, other=0.0)
    return t


@triton.autotune(configs=_gemv_configs(), key=["BLOCK_M", "R", "N"])
@triton.heuristics({"BLOCK_W": _words_per_step})
@triton.jit
def _gemv_stage2(
    t_ptr, u_ptr, l_ptr, h_ptr, ru_ptr, rl_ptr, rh_ptr, b_ptr, y_ptr,
    M, N, R, RW, stride_u, stride_ru, stride_ym, path_stride, SPLITS, split_stride,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """``y[m, n] = Σ_p h[p][n] Σ_j S_U[p][n, j] · l[p][j] · t[p, m, j] (+ bias)``; grid (⌈d_out/BLOCK_N⌉,)."""
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W, 32), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W, 32), dtype=tl.float32)
    for w0 in range(0, RW, BLOCK_W):
        offs_w, offs_j = _word_lanes(w0, BLOCK_W)
        mask_j = (offs_w < RW)[:, None] & (offs_j < R)
        t_ptrs = t_ptr + offs_m[:, None, None] * R + offs_j[None, :, :]
        t_mask = mask_m[:, None, None] & mask_j[None, :, :]
        word_mask = mask_n[:, None] & (offs_w < RW)[None, :]
        l = tl.load(l_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        words = tl.load(u_ptr + offs_n[:, None] * stride_u + offs_w[None, :], mask=word_mask, other=0)
        acc += _signed_terms(_latent(t_ptrs, t_mask, SPLITS, split_stride) * l[None, :, :], words)
        if HAS_RES:
            l_res = tl.load(rl_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            words_res = tl.load(ru_ptr + offs_n[:, None] * stride_ru + offs_w[None, :], mask=word_mask, other=0)
            t_res = _latent(t_ptrs + path_stride, t_mask, SPLITS, split_stride)
            acc_res += _signed_terms(t_res * l_res[None, :, :], words_res)
    _epilogue(tl.sum(tl.sum(acc, axis=3), axis=2), tl.sum(tl.sum(acc_res, axis=3), axis=2), h_ptr, rh_ptr, b_ptr,
              y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_RES, HAS_BIAS)
