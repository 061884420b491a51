"""Triton kernels of the packed binary low-rank layer ``Y = Σ_paths ((((X ⊙ g) S_Vᵀ) ⊙ l) S_Uᵀ) ⊙ h + bias``.

The layer's checkpoint format is used as it is, no repacking: ``v_bits`` is (r, ⌈d_in/32⌉) int32 with the signs of
``S_V`` packed along ``d_in`` (the reduction dimension of stage 1) and ``u_bits`` is (d_out, ⌈r/32⌉) with ``S_U``
packed along ``r`` (the reduction dimension of stage 2); LSB first, bit 1 means −1, padding bits are 0 (+1) and are
masked out. A tile of ±1 values is expanded in registers from *replicated* word pointers: element ``k`` of a row
reads word ``k // 32`` and takes bit ``k % 32``, so every word is fetched from global memory once and served to its
32 lanes from L1.

Two kernel families, both two-stage (stage 1 over ``d_in`` → an fp32 latent ``t`` of shape (paths, M, r); stage 2
over ``r`` → ``Y``), both with all three scales fused (g on load, l between the stages, h, the residual path and the
bias in stage 2's epilogue) and fp32 accumulation:

* **decode** (``M ≤ DECODE_MAX_TOKENS``): GEMV by broadcast-multiply-and-sum. Stage 1 is split-K over ``d_in`` so
  that enough programs run to saturate the memory system (fp32 ``atomic_add`` into ``t``); stage 2 reads ``t`` once
  per output tile. Batch-1 decoding is bound by weight traffic, which these kernels cut 16–150× against fp16.
* **prefill** (more tokens): ``tl.dot`` GEMMs whose ±1 operand tile is unpacked in registers (exact in fp16).
  fp16 activations multiply in fp16; bf16 and fp32 activations multiply in fp32 (bf16 is never used inside the
  kernels, which also keeps them correct under the Triton interpreter, whose bf16 arithmetic is broken).

Only plain pointer arithmetic is used (no ``tl.make_block_ptr``, removed in Triton 3.9), so the code compiles with
Triton 3.6–3.9. With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU tensors;
the tests compare them with the PyTorch reference there.

:func:`binary_lowrank_linear` is registered as the custom op ``torch.ops.hf_littlebit.binary_lowrank_linear``
(``torch.library.custom_op`` with a fake implementation that only computes the output's shape), so ``torch.compile``
traces models through it without a graph break and CUDA graphs (``mode="reduce-overhead"``, static KV cache)
replay its launches. It is an opaque op rather than a ``triton_op``: the compiler then never traces into the kernels,
which keeps the same op usable under the CPU interpreter, where compiled tracing of Triton launches is unsupported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Up to this many tokens the GEMV (decode) kernels run; above it the ``tl.dot`` (prefill) kernels.
DECODE_MAX_TOKENS = 8

OP_NAME = "hf_littlebit::binary_lowrank_linear"


# --------------------------------------------------------------------------------------------------- decode (GEMV)
@triton.jit
def _signs(words, shift):
    """±1.0 (fp32) from int32 words and per-element bit positions (bit 1 means −1; arithmetic shift, then & 1)."""
    return 1.0 - 2.0 * ((words >> shift) & 1).to(tl.float32)


@triton.jit
def _gemv_stage1(
    x_ptr, v_ptr, g_ptr, rv_ptr, rg_ptr, t_ptr,
    M, K, R, KW, stride_xm, K_PER_SPLIT,
    HAS_RES: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[p, m, j] (+)= Σ_k S_V[p][j, k] · x[m, k] · g[p][k] over one split of k; grid (⌈r/BLOCK_R⌉, splits)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        word_ptrs = offs_r[:, None] * KW + (offs_k // 32)[None, :]
        word_mask = mask_r[:, None] & mask_k[None, :]
        shift = (offs_k % 32)[None, :]
        s = _signs(tl.load(v_ptr + word_ptrs, mask=word_mask, other=0), shift)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += tl.sum((x * g[None, :])[:, None, :] * s[None, :, :], axis=2)
        if HAS_RES:
            s_res = _signs(tl.load(rv_ptr + word_ptrs, mask=word_mask, other=0), shift)
            g_res = tl.load(rg_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc_res += tl.sum((x * g_res[None, :])[:, None, :] * s_res[None, :, :], axis=2)
    t_ptrs = t_ptr + offs_m[:, None] * R + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(t_ptrs, acc, mask=t_mask)
        if HAS_RES:
            tl.atomic_add(t_ptrs + M * R, acc_res, mask=t_mask)
    else:
        tl.store(t_ptrs, acc, mask=t_mask)
        if HAS_RES:
            tl.store(t_ptrs + M * R, acc_res, mask=t_mask)


@triton.jit
def _gemv_stage2(
    t_ptr, u_ptr, l_ptr, h_ptr, ru_ptr, rl_ptr, rh_ptr, b_ptr, y_ptr,
    M, N, R, RW, stride_ym,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """y[m, n] = Σ_p h[p][n] Σ_j S_U[p][n, j] · l[p][j] · t[p, m, j] (+ bias); grid (⌈d_out/BLOCK_N⌉,)."""
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < R
        t_ptrs = t_ptr + offs_m[:, None] * R + offs_j[None, :]
        t_mask = mask_m[:, None] & mask_j[None, :]
        word_ptrs = offs_n[:, None] * RW + (offs_j // 32)[None, :]
        word_mask = mask_n[:, None] & mask_j[None, :]
        shift = (offs_j % 32)[None, :]
        tl_ = tl.load(t_ptrs, mask=t_mask, other=0.0) * tl.load(l_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        s = _signs(tl.load(u_ptr + word_ptrs, mask=word_mask, other=0), shift)
        acc += tl.sum(tl_[:, None, :] * s[None, :, :], axis=2)
        if HAS_RES:
            tl_res = tl.load(t_ptrs + M * R, mask=t_mask, other=0.0) * tl.load(
                rl_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            s_res = _signs(tl.load(ru_ptr + word_ptrs, mask=word_mask, other=0), shift)
            acc_res += tl.sum(tl_res[:, None, :] * s_res[None, :, :], axis=2)
    y = acc * tl.load(h_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += acc_res * tl.load(rh_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------- prefill (GEMM)
@triton.jit
def _dot(a, b, DOT_FP16: tl.constexpr):
    """fp32-accumulated product; fp16 operands when the activations are fp16, else fp32 without TF32 rounding."""
    if DOT_FP16:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gemm_stage1(
    x_ptr, v_ptr, g_ptr, rv_ptr, rg_ptr, t_ptr,
    M, K, R, KW, stride_xm,
    HAS_RES: tl.constexpr, DOT_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """t[p] = (X ⊙ g[p]) S_V[p]ᵀ for one (BLOCK_M × BLOCK_R) tile; grid (⌈M/BLOCK_M⌉, ⌈r/BLOCK_R⌉)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        # (BLOCK_K, BLOCK_R) tile of S_Vᵀ: element (k, j) is bit k % 32 of word (j, k // 32).
        word_ptrs = offs_r[None, :] * KW + (offs_k // 32)[:, None]
        word_mask = mask_k[:, None] & mask_r[None, :]
        shift = (offs_k % 32)[:, None]
        s = _signs(tl.load(v_ptr + word_ptrs, mask=word_mask, other=0), shift)
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        acc += _dot(x * g[None, :], s, DOT_FP16)
        if HAS_RES:
            s_res = _signs(tl.load(rv_ptr + word_ptrs, mask=word_mask, other=0), shift)
            g_res = tl.load(rg_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc_res += _dot(x * g_res[None, :], s_res, DOT_FP16)
    t_ptrs = t_ptr + offs_m[:, None] * R + offs_r[None, :]
    t_mask = mask_m[:, None] & mask_r[None, :]
    tl.store(t_ptrs, acc, mask=t_mask)
    if HAS_RES:
        tl.store(t_ptrs + M * R, acc_res, mask=t_mask)


@triton.jit
def _gemm_stage2(
    t_ptr, u_ptr, l_ptr, h_ptr, ru_ptr, rl_ptr, rh_ptr, b_ptr, y_ptr,
    M, N, R, RW, stride_ym,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Y tile = Σ_p ((t[p] ⊙ l[p]) S_U[p]ᵀ) ⊙ h[p] (+ bias); grid (⌈M/BLOCK_M⌉, ⌈d_out/BLOCK_N⌉)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < R
        t_ptrs = t_ptr + offs_m[:, None] * R + offs_j[None, :]
        t_mask = mask_m[:, None] & mask_j[None, :]
        # (BLOCK_J, BLOCK_N) tile of S_Uᵀ: element (j, n) is bit j % 32 of word (n, j // 32).
        word_ptrs = offs_n[None, :] * RW + (offs_j // 32)[:, None]
        word_mask = mask_j[:, None] & mask_n[None, :]
        shift = (offs_j % 32)[:, None]
        tl_ = tl.load(t_ptrs, mask=t_mask, other=0.0) * tl.load(l_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        s = _signs(tl.load(u_ptr + word_ptrs, mask=word_mask, other=0), shift)
        acc += _dot(tl_, s, DOT_FP16)
        if HAS_RES:
            tl_res = tl.load(t_ptrs + M * R, mask=t_mask, other=0.0) * tl.load(
                rl_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
            s_res = _signs(tl.load(ru_ptr + word_ptrs, mask=word_mask, other=0), shift)
            acc_res += _dot(tl_res, s_res, DOT_FP16)
    y = acc * tl.load(h_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += acc_res * tl.load(rh_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------------- launch logic
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _default_split_k(x: torch.Tensor, r_blocks: int, k_blocks: int) -> int:
    """Splits of d_in so that about two programs per streaming multiprocessor run stage 1 (one on the interpreter)."""
    if x.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(k_blocks, triton.cdiv(2 * sms, r_blocks)))


def _check(x: torch.Tensor, v_bits: torch.Tensor, u_bits: torch.Tensor, vectors: dict[str, torch.Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"binary_lowrank_linear: x must be 2-D (tokens, d_in), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"binary_lowrank_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    if v_bits.dtype != torch.int32 or u_bits.dtype != torch.int32:
        raise ValueError("binary_lowrank_linear: packed signs must be int32 (the checkpoint format)")
    rank, d_in, d_out = v_bits.shape[0], x.shape[1], u_bits.shape[0]
    if v_bits.shape[1] != triton.cdiv(d_in, 32) or u_bits.shape[1] != triton.cdiv(rank, 32):
        raise ValueError(f"binary_lowrank_linear: packed shapes v_bits {tuple(v_bits.shape)} / u_bits "
                         f"{tuple(u_bits.shape)} do not match d_in={d_in}, rank={rank}")
    want = {"g": d_in, "l": rank, "h": d_out}
    for name, vec in vectors.items():
        if vec.numel() != want[name.removeprefix("res_")]:
            raise ValueError(f"binary_lowrank_linear: {name} has {vec.numel()} entries, expected "
                             f"{want[name.removeprefix('res_')]}")


@torch.library.custom_op(OP_NAME, mutates_args=())
def binary_lowrank_linear(
    x: torch.Tensor,
    v_bits: torch.Tensor,
    g: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
    u_bits: torch.Tensor,
    h: torch.Tensor,
    res_v_bits: torch.Tensor | None,
    res_g: torch.Tensor | None,
    res_l: torch.Tensor | None,
    res_u_bits: torch.Tensor | None,
    res_h: torch.Tensor | None,
    bias: torch.Tensor | None,
    split_k: int = 0,
    force_gemm: bool = False,
) -> torch.Tensor:
    """``Y`` (tokens × d_out, in ``x``'s dtype) of one packed layer, main path plus optional residual path.

    ``x`` is (tokens, d_in); the packed tensors and scale vectors are the layer's own (any float dtype for the
    scales). Up to :data:`DECODE_MAX_TOKENS` tokens run the split-K GEMV kernels, more the ``tl.dot`` kernels
    (``force_gemm`` runs the latter at any size, for tests and benchmarks). ``split_k=0`` picks the number of
    splits of stage 1 from the GPU's size; with more than one split the fp32 sums use atomics (their order, hence
    the last bits, may vary from run to run).
    """
    has_res = res_v_bits is not None
    vectors = {"g": g, "l": l, "h": h}
    if has_res:
        if any(t is None for t in (res_g, res_l, res_u_bits, res_h)):
            raise ValueError("binary_lowrank_linear: the residual path needs all of res_v_bits, res_g, res_l, "
                             "res_u_bits and res_h")
        vectors.update(res_g=res_g, res_l=res_l, res_h=res_h)
    _check(x, v_bits, u_bits, vectors)
    x = x.contiguous()
    m, d_in = x.shape
    rank, d_out = v_bits.shape[0], u_bits.shape[0]
    kw, rw = v_bits.shape[1], u_bits.shape[1]
    n_paths = 2 if has_res else 1
    y = torch.empty((m, d_out), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    # Unused residual/bias pointers point at the main path's tensors; the constexpr flags keep them unread.
    rv, rg, rl, ru, rh = (res_v_bits, res_g, res_l, res_u_bits, res_h) if has_res else (v_bits, g, l, u_bits, h)
    b = bias if bias is not None else h
    if m <= DECODE_MAX_TOKENS and not force_gemm:
        block_m = _next_pow2(m)
        block_r, block_k = 32, max(32, 256 // block_m)
        r_blocks, k_blocks = triton.cdiv(rank, block_r), triton.cdiv(d_in, block_k)
        splits = split_k or _default_split_k(x, r_blocks, k_blocks)
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(d_in, k_per_split)
        atomic = splits > 1
        t = (torch.zeros if atomic else torch.empty)((n_paths, m, rank), device=x.device, dtype=torch.float32)
        _gemv_stage1[(r_blocks, splits)](
            x, v_bits, g, rv, rg, t, m, d_in, rank, kw, x.stride(0), k_per_split,
            HAS_RES=has_res, ATOMIC=atomic, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        )
        block_n, block_j = 32, max(32, 256 // block_m)
        _gemv_stage2[(triton.cdiv(d_out, block_n),)](
            t, u_bits, l, h, ru, rl, rh, b, y, m, d_out, rank, rw, y.stride(0),
            HAS_RES=has_res, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j,
        )
        return y
    dot_fp16 = x.dtype == torch.float16
    block_m = 64 if m >= 64 else max(16, _next_pow2(m))
    t = torch.empty((n_paths, m, rank), device=x.device, dtype=torch.float32)
    block_r, block_k = 64, 64
    _gemm_stage1[(triton.cdiv(m, block_m), triton.cdiv(rank, block_r))](
        x, v_bits, g, rv, rg, t, m, d_in, rank, kw, x.stride(0),
        HAS_RES=has_res, DOT_FP16=dot_fp16, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    block_n, block_j = 64, 64
    _gemm_stage2[(triton.cdiv(m, block_m), triton.cdiv(d_out, block_n))](
        t, u_bits, l, h, ru, rl, rh, b, y, m, d_out, rank, rw, y.stride(0),
        HAS_RES=has_res, HAS_BIAS=bias is not None, DOT_FP16=dot_fp16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j,
    )
    return y


@binary_lowrank_linear.register_fake
def _(x, v_bits, g, l, u_bits, h, res_v_bits, res_g, res_l, res_u_bits, res_h, bias,  # noqa: E741
      split_k=0, force_gemm=False):
    """Shape/dtype of the output without running anything (for ``torch.compile`` and meta tensors)."""
    return x.new_empty((x.shape[0], u_bits.shape[0]))
