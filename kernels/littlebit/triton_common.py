"""Pieces shared by the Triton decode and prefill kernels: the interpreter flag and the fp32 epilogue."""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: Read once, like Triton itself reads it when the kernels below are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _epilogue(acc, acc_res, h_ptr, rh_ptr, b_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym,
              HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``y = acc ⊙ h (+ acc_res ⊙ h_res) (+ bias)`` in fp32, stored in ``y``'s dtype (64-bit row offsets)."""
    y = acc * tl.load(h_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += acc_res * tl.load(rh_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])
