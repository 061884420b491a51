"""Triton kernels of the packed binary low-rank layer ``Y = Σ_paths ((((X ⊙ g) S_Vᵀ) ⊙ l) S_Uᵀ) ⊙ h + bias``.

The layer's checkpoint format is used as it is, no repacking: ``v_bits`` is (r, ⌈d_in/32⌉) int32 with the signs of
``S_V`` packed along ``d_in`` (the reduction dimension of stage 1) and ``u_bits`` is (d_out, ⌈r/32⌉) with ``S_U``
packed along ``r`` (the reduction dimension of stage 2); LSB first, bit 1 means −1, padding bits are 0 (+1) and are
masked out. Packed tensors may be row-strided views (e.g. a tensor-parallel shard cut along the words) as long as
their words are contiguous within a row; other layouts are refused with a clear error rather than read wrongly.

Two kernel families (:mod:`.triton_gemv` for decode, :mod:`.triton_gemm` for prefill, shared pieces in
:mod:`.triton_common`; this module holds the launch logic and the custom op), both two-stage (stage 1 over ``d_in``
→ an fp32 latent ``t``; stage 2 over ``r`` → ``Y``), both with all three scales fused (g on load, l between the
stages, h, the residual path and the bias in stage 2's epilogue). **One numerics policy for both**: scales are
applied in fp32, ``t`` is kept in fp32 in global memory, every product is accumulated in fp32, and an intermediate
is never rounded to a format whose *range* it may exceed.

* **decode** (``M ≤ DECODE_MAX_TOKENS``): GEMV shaped for memory bandwidth. Each program loads a tile of sign words
  once, expands each word's 32 bits in registers, and applies a sign by moving the bit to bit 31 and XORing it into
  the fp32 activation (no int→float conversion, no multiply). Partial terms are accumulated element-wise across the
  loop and reduced once at the end. Stage 1 is split over ``d_in`` so that enough programs run to saturate the
  memory system; each split **stores** its partial latent into its own slice of a buffer and stage 2 sums the
  slices in a fixed order in its prologue: no atomics, so results are bitwise reproducible for a given split count.
  The split count comes from the GPU's size, or from the caller (``split_k``; the layer glue reads it from a layer
  attribute or ``$LITTLEBIT_SPLIT_K``). Block sizes and warps are picked by ``triton.autotune`` over a small set
  (one config under the interpreter, whose benchmarker needs a GPU).
* **prefill** (more tokens): ``tl.dot`` GEMMs whose ±1 operand tile is unpacked in registers (exact in fp16/bf16).
  fp16 activations multiply in fp16 on tensor cores, but each row of the activation-side tile is first rescaled by
  an exact power of two that brings its largest magnitude to [2¹⁴, 2¹⁵), and the fp32 product is scaled back.
  Rounding to fp16 then costs only its 11-bit precision, never its range: a stage-1 latent of 7·10⁴ (which the old
  fp16 cast turned into inf) or a tiny ``x ⊙ g`` (which fp16 flushed to subnormals) is represented as well as any
  other value. The rescale is exact and costs one row max per tile, far less than the alternative that also avoids
  overflow (fp32 operands without tensor cores, or TF32 at half the fp16 rate). bf16 has fp32's range and needs no
  rescale: bf16 activations multiply in bf16 on the GPU. fp32 activations multiply in fp32 (``ieee``, no TF32).
  Under the Triton interpreter (``TRITON_INTERPRET=1``), whose bf16 arithmetic is broken, bf16 falls back to the
  fp32 dot; that choice is made from the interpreter flag, not from the dtype.

Row offsets are computed in 64 bits where ``tokens × width`` can exceed 2³¹ (activations, latent, output); launches
run under a device guard on the input's GPU, so layers spread over several GPUs (``device_map="auto"``) work.

Only plain pointer arithmetic is used (no ``tl.make_block_ptr``, removed in Triton 3.9), so the code compiles with
Triton 3.6–3.9. With ``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU tensors;
the tests compare them with the PyTorch reference there.

:func:`binary_lowrank_linear` is registered as the custom op ``torch.ops.hf_littlebit.binary_lowrank_linear``
(``torch.library.custom_op`` with a fake implementation that only computes the output's shape), so ``torch.compile``
traces models through it without a graph break and CUDA graphs (``mode="reduce-overhead"``, static KV cache)
replay its launches. It is an opaque op rather than a ``triton_op``: the compiler then never traces into the kernels,
which keeps the same op usable under the CPU interpreter, where compiled tracing of Triton launches is unsupported.
Its gradient (input only; the packed factors are frozen) is registered by :mod:`hf_littlebit.backends.triton`, so
this package imports nothing of hf_littlebit.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from .triton_common import INTERPRET
from .triton_gemm import DOT_BF16, DOT_FP16, DOT_FP32, _gemm_stage1, _gemm_stage2
from .triton_gemv import GEMV_TILE_ELEMS, _gemv_stage1, _gemv_stage2

#: Up to this many tokens the GEMV (decode) kernels run; above it the ``tl.dot`` (prefill) kernels.
DECODE_MAX_TOKENS = 8

OP_NAME = "hf_littlebit::binary_lowrank_linear"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_split_k(x: torch.Tensor, r_blocks: int, word_blocks: int) -> int:
    """Splits of d_in so that about two programs per streaming multiprocessor run stage 1 (one off the GPU)."""
    if x.device.type != "cuda":
        return 1
    return max(1, min(word_blocks, triton.cdiv(2 * _sm_count(x.device), r_blocks)))


def launch_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launches go to the current CUDA device: make that the input's device (a no-op off CUDA)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def dot_kind(dtype: torch.dtype, interpret: bool = INTERPRET) -> int:
    """``DOT`` of the prefill kernels for activations of ``dtype`` (bf16 falls back to fp32 only when interpreted)."""
    if dtype == torch.float16:
        return DOT_FP16
    if dtype == torch.bfloat16 and not interpret:
        return DOT_BF16
    return DOT_FP32


def _check_packed(name: str, bits: torch.Tensor, x: torch.Tensor) -> None:
    if bits.dtype != torch.int32:
        raise ValueError(f"binary_lowrank_linear: {name} must be int32 (the checkpoint format), got {bits.dtype}")
    if bits.dim() != 2 or (bits.stride(1) != 1 and bits.shape[1] > 1):
        raise ValueError(f"binary_lowrank_linear: {name} must be 2-D with contiguous words in each row (strides "
                         f"{bits.stride()}); call .contiguous() on it first")
    if bits.device != x.device:
        raise ValueError(f"binary_lowrank_linear: {name} is on {bits.device}, the input on {x.device}")


def _check(x: torch.Tensor, packed: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"binary_lowrank_linear: x must be 2-D (tokens, d_in), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"binary_lowrank_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, bits in packed.items():
        _check_packed(name, bits, x)
    v_bits, u_bits = packed["v_bits"], packed["u_bits"]
    rank, d_in, d_out = v_bits.shape[0], x.shape[1], u_bits.shape[0]
    for prefix in ("", "res_"):
        v, u = packed.get(prefix + "v_bits"), packed.get(prefix + "u_bits")
        if v is not None and (v.shape != (rank, triton.cdiv(d_in, 32)) or u.shape != (d_out, triton.cdiv(rank, 32))):
            raise ValueError(f"binary_lowrank_linear: packed shapes {prefix}v_bits {tuple(v.shape)} / {prefix}u_bits "
                             f"{tuple(u.shape)} do not match d_in={d_in}, rank={rank}")
    want = {"g": d_in, "l": rank, "h": d_out, "bias": d_out}
    for name, vec in vectors.items():
        expected = want[name.removeprefix("res_")]
        if vec.numel() != expected:
            raise ValueError(f"binary_lowrank_linear: {name} has {vec.numel()} entries, expected {expected}")
        if vec.device != x.device:
            raise ValueError(f"binary_lowrank_linear: {name} is on {vec.device}, the input on {x.device}")


def _flat(vec: torch.Tensor) -> torch.Tensor:
    """A scale vector as the kernels read it: 1-D and contiguous (a copy only for strided views; vectors are tiny)."""
    return vec.reshape(-1).contiguous()


def _launch_gemv(x: torch.Tensor, y: torch.Tensor, p: list[torch.Tensor], b: torch.Tensor, has_res: bool,
                 has_bias: bool, split_k: int) -> None:
    """Split stage 1 into partial latents (one slice per split), then stage 2 sums them and writes ``y``."""
    v, g, l, u, h, rv, rg, rl, ru, rh = p
    m, d_in = x.shape
    rank, d_out, kw = v.shape[0], u.shape[0], v.shape[1]
    block_m = _next_pow2(m)
    # Word blocks per split are counted at the smallest tuned block; autotuning then only changes the tiling.
    min_block_w = max(1, GEMV_TILE_ELEMS // (block_m * 64 * 32))
    word_blocks = triton.cdiv(kw, min_block_w)
    splits = split_k or _default_split_k(x, triton.cdiv(rank, 32), word_blocks)
    w_per_split = triton.cdiv(word_blocks, min(splits, word_blocks)) * min_block_w
    splits = triton.cdiv(kw, w_per_split)
    n_paths = 2 if has_res else 1
    path_stride, split_stride = m * rank, n_paths * m * rank
    t = torch.empty((splits, n_paths, m, rank), device=x.device, dtype=torch.float32)
    _gemv_stage1[lambda meta: (triton.cdiv(rank, meta["BLOCK_N"]), splits)](
        x, v, g, rv, rg, t, m, d_in, rank, kw, x.stride(0), v.stride(0), rv.stride(0), w_per_split,
        path_stride, split_stride, HAS_RES=has_res, BLOCK_M=block_m,
    )
    _gemv_stage2[lambda meta: (triton.cdiv(d_out, meta["BLOCK_N"]),)](
        t, u, l, h, ru, rl, rh, b, y, m, d_out, rank, u.shape[1], u.stride(0), ru.stride(0), y.stride(0),
        path_stride, splits, split_stride, HAS_RES=has_res, HAS_BIAS=has_bias, BLOCK_M=block_m,
    )


def _launch_gemm(x: torch.Tensor, y: torch.Tensor, p: list[torch.Tensor], b: torch.Tensor, has_res: bool,
                 has_bias: bool) -> None:
    """The two ``tl.dot`` stages; the fp32 latent goes through global memory."""
    v, g, l, u, h, rv, rg, rl, ru, rh = p
    m, d_in = x.shape
    rank, d_out = v.shape[0], u.shape[0]
    dot = dot_kind(x.dtype)
    block_m = 64 if m >= 64 else max(16, _next_pow2(m))
    t = torch.empty((2 if has_res else 1, m, rank), device=x.device, dtype=torch.float32)
    block_r, block_k = 64, 64
    _gemm_stage1[(triton.cdiv(m, block_m), triton.cdiv(rank, block_r))](
        x, v, g, rv, rg, t, m, d_in, rank, x.stride(0), v.stride(0), rv.stride(0), m * rank,
        HAS_RES=has_res, DOT=dot, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    block_n, block_j = 64, 64
    _gemm_stage2[(triton.cdiv(m, block_m), triton.cdiv(d_out, block_n))](
        t, u, l, h, ru, rl, rh, b, y, m, d_out, rank, u.stride(0), ru.stride(0), y.stride(0), m * rank,
        HAS_RES=has_res, HAS_BIAS=has_bias, DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_J=block_j,
    )


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
    splits of stage 1 from the GPU's size; any count gives bitwise reproducible results (partials are summed in a
    fixed order), and counts differ from each other only by fp32 rounding.
    """
    has_res = res_v_bits is not None
    packed = {"v_bits": v_bits, "u_bits": u_bits}
    vectors = {"g": g, "l": l, "h": h}
    if has_res:
        if any(t is None for t in (res_g, res_l, res_u_bits, res_h)):
            raise ValueError("binary_lowrank_linear: the residual path needs all of res_v_bits, res_g, res_l, "
                             "res_u_bits and res_h")
        packed.update(res_v_bits=res_v_bits, res_u_bits=res_u_bits)
        vectors.update(res_g=res_g, res_l=res_l, res_h=res_h)
    if bias is not None:
        vectors["bias"] = bias
    if split_k < 0:
        raise ValueError(f"binary_lowrank_linear: split_k must be ≥ 0 (0 = automatic), got {split_k}")
    _check(x, packed, vectors)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((x.shape[0], u_bits.shape[0]), device=x.device, dtype=x.dtype)
    if x.shape[0] == 0:
        return y
    main = [v_bits, _flat(g), _flat(l), u_bits, _flat(h)]
    # Unused residual/bias pointers point at the main path's tensors; the constexpr flags keep them unread.
    res = [res_v_bits, _flat(res_g), _flat(res_l), res_u_bits, _flat(res_h)] if has_res else main
    b = _flat(bias) if bias is not None else main[4]
    with launch_guard(x):
        if x.shape[0] <= DECODE_MAX_TOKENS and not force_gemm:
            _launch_gemv(x, y, main + res, b, has_res, bias is not None, split_k)
        else:
            _launch_gemm(x, y, main + res, b, has_res, bias is not None)
    return y


@binary_lowrank_linear.register_fake
def _(x, v_bits, g, l, u_bits, h, res_v_bits, res_g, res_l, res_u_bits, res_h, bias,  # noqa: E741
      split_k=0, force_gemm=False):
    """Shape/dtype of the output without running anything (for ``torch.compile`` and meta tensors)."""
    return x.new_empty((x.shape[0], u_bits.shape[0]))
