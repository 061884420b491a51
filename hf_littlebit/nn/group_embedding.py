"""``GroupQuantEmbedding``: a token embedding in a few-bit group format, for ``whole_model`` compression.

Why not binary low-rank, like every other matrix: the embedding is not low-rank. On SmolLM2's 49,152 × 576 tied
embedding the relative error of the binary factorisation stays between 0.65 and 0.72 from rank 64 to the full rank
576 (BENCHMARKS.md, "Whole-model compression (issue 22)"), so more bits barely help; its rows are individually
well-behaved vectors, which is what per-group scalar quantization serves well (4 bits in groups of 64: error ≈ 0.1).

Format (:mod:`hf_littlebit.format.group_quant`): each row in groups of ``group_size`` consecutive entries, each entry
a ``bits``-bit code read back as ``zero + scale · code``; the codes bit-packed into int32 words (``codes``, vocab ×
⌈hidden · bits / 32⌉), ``scales`` and ``zeros`` fp16 (vocab × groups). Nothing else is stored.

* **lookup** (``forward(input_ids)``): only the requested rows' words, scales and zeros are gathered and decoded;
  the vocab × hidden matrix is never built.
* **tied LM head** (:meth:`GroupQuantEmbedding.logits`): ``x Êᵀ`` over chunks of the vocabulary (decode a chunk,
  one matmul into its slice of the logits, next chunk), so the extra memory is one chunk, about
  :attr:`~GroupQuantEmbedding.head_chunk_elements` entries. Gradients flow to ``x`` (adapters, the end-to-end phase
  upstream of the head) through a backward that decodes the chunks again instead of keeping them. For few tokens
  without gradient (token-by-token generation) a packed kernel computes it from the codes in place instead
  (:func:`~hf_littlebit.backends.dispatch.group_head_kernel`): on CPU the C++ kernel (up to
  :data:`~hf_littlebit.backends.cpu.GROUP_HEAD_MAX_TOKENS` tokens; ``LITTLEBIT_CPU_KERNEL=0``, or no compiler, leaves
  the chunked path), on CUDA the Triton kernel (:mod:`hf_littlebit.kernels.group_head`, up to
  :data:`~hf_littlebit.backends.triton.TRITON_GROUP_HEAD_MAX_TOKENS` tokens); ``$LITTLEBIT_BACKEND=torch`` keeps the
  chunked path everywhere.
* **Tuning the scales** (:meth:`~GroupQuantEmbedding.tune_scales_` / :meth:`~GroupQuantEmbedding.freeze_scales_`):
  the calibration's end-to-end phase turns ``scales`` and ``zeros`` into fp32 trainable parameters, the codes fixed,
  as it tunes the scale vectors of the binary layers; lookup and head then pass gradients to them (the head's
  backward decodes each chunk once more and hands its ``∂L/∂Ê`` to the decode). Freezing rounds them back to their
  storage dtype. QAT does the same: :func:`~hf_littlebit.nn.modes.make_trainable` tunes the scales and zeros
  (codes fixed), :func:`~hf_littlebit.nn.modes.pack` freezes them, and a save while training writes them in the
  storage dtype. It is not a :class:`~hf_littlebit.nn.layer.LittleBitLinear`: the layers' ``backend`` setting
  passes it by (only ``$LITTLEBIT_BACKEND`` reaches it). Outside the kernels, plain tensor ops: any device works.

A tied head is a :class:`~hf_littlebit.nn.embedding.LittleBitTiedHead` over this module, as for the binary format.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends.dispatch import group_head_kernel
from ..format.group_quant import (
    dequantize_groups,
    group_count,
    group_quant_bits,
    pack_codes,
    packed_code_width,
    quantize_groups,
    unpack_codes,
)
from .embedding import ScaledEmbedding, dense_embed_scale, scaled_rows, token_ids

__all__ = ["GroupQuantEmbedding"]

STORED = ("codes", "scales", "zeros")


class GroupQuantEmbedding(nn.Module):
    """Few-bit group-quantized ``nn.Embedding`` replacement (see the module docstring).

    ``output_dtype`` is the dtype of the looked-up vectors (the replaced embedding's), held by the empty parameter
    ``dtype_tag`` so that it follows ``.to(dtype)``; ``embed_scale`` multiplies every looked-up vector (Gemma).
    Created empty (zeros; on the meta device for loading) and filled by :meth:`set_weight_` or a state dict.
    """

    head_chunk_elements = 1 << 22  # vocab rows decoded at a time by the head: this many entries (16 MiB in fp32)

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 scale_dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 output_dtype: torch.dtype = torch.float32, padding_idx: int | None = None,
                 embed_scale: float | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        self.padding_idx, self.embed_scale = padding_idx, embed_scale
        self._scales_tuned = False  # a flag, not requires_grad: PEFT or requires_grad_(False) must not clear it
        # Registered first: Transformers takes a model's dtype from its first floating parameter (LittleBitEmbedding).
        self.dtype_tag = nn.Parameter(torch.empty(0, dtype=output_dtype, device=device), requires_grad=False)
        for name, (shape, dtype) in self.expected_tensors().items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                       requires_grad=False))

    @classmethod
    def like(cls, dense: nn.Embedding, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
             device: torch.device | str | None = None) -> GroupQuantEmbedding:
        """An empty module with the shape, dtype, padding index and scale of ``dense``."""
        return cls(dense.num_embeddings, dense.embedding_dim, bits, group_size, scale_dtype=scale_dtype,
                   device=device, output_dtype=dense.weight.dtype, padding_idx=dense.padding_idx,
                   embed_scale=dense_embed_scale(dense))

    @property
    def output_dtype(self) -> torch.dtype:
        return self.dtype_tag.dtype

    @property
    def in_features(self) -> int:  # the head's view, as for LittleBitEmbedding
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def is_packed(self) -> bool:
        return not any(getattr(self, name).is_meta for name in STORED)

    @property
    def scales_tuned(self) -> bool:
        """Whether ``scales`` and ``zeros`` are in the fp32 form of :meth:`tune_scales_` (trainable unless something
        froze them since, e.g. PEFT); saving then rounds them to ``scale_dtype``."""
        return self._scales_tuned

    def tune_scales_(self) -> None:
        """``scales`` and ``zeros`` as fp32 parameters that take gradients (the codes stay fixed), for the
        calibration's end-to-end phase; :meth:`freeze_scales_` undoes it."""
        for name in ("scales", "zeros"):
            self._set_stored(name, getattr(self, name).detach().float(), requires_grad=True)
        self._scales_tuned = True

    def freeze_scales_(self) -> None:
        """Round tuned ``scales`` and ``zeros`` back to the storage dtype, frozen (what is saved)."""
        for name in ("scales", "zeros"):
            self._set_stored(name, getattr(self, name).detach().to(self.scale_dtype), requires_grad=False)
        self._scales_tuned = False

    def _set_stored(self, name: str, value: torch.Tensor, requires_grad: bool = False) -> None:
        param = nn.Parameter(value.contiguous(), requires_grad=requires_grad)
        param._is_hf_initialized = True  # tell Transformers not to re-initialise it
        self.register_parameter(name, param)

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name → (shape, dtype) of every stored tensor, as a checkpoint of this module must hold them."""
        groups = group_count(self.embedding_dim, self.group_size)
        return {"codes": ((self.num_embeddings, packed_code_width(self.embedding_dim, self.bits)), torch.int32),
                "scales": ((self.num_embeddings, groups), self.scale_dtype),
                "zeros": ((self.num_embeddings, groups), self.scale_dtype)}

    def stored_bits(self) -> int:
        """Bits of the codes (padding words included), scales and zeros as stored."""
        return group_quant_bits(self.num_embeddings, self.embedding_dim, self.bits, self.group_size,
                                torch.finfo(self.scale_dtype).bits)

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """Quantize the dense ``weight`` (vocab × hidden) into this module, on ``weight``'s device."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"GroupQuantEmbedding: weight of shape {tuple(weight.shape)} for a "
                             f"{self.num_embeddings} × {self.embedding_dim} embedding")
        codes, scales, zeros = quantize_groups(weight, self.bits, self.group_size, self.scale_dtype)
        for name, value in (("codes", pack_codes(codes, self.bits)), ("scales", scales), ("zeros", zeros)):
            self._set_stored(name, value)

    # ------------------------------------------------------------------ decoding
    def decode(self, index: torch.Tensor | slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` (1-D ids or a slice) of ``Ê`` in ``dtype`` (unscaled), decoded from the stored tensors."""
        codes = unpack_codes(self.codes[index], self.embedding_dim, self.bits)
        return dequantize_groups(codes, self.scales[index], self.zeros[index], self.group_size, dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``Ê`` (vocab × hidden), chunk by chunk (for ``dequantize()`` and checks; never used by forward)."""
        return torch.cat([self.decode(slice(a, a + self._chunk_rows()), dtype)
                          for a in range(0, self.num_embeddings, self._chunk_rows())])

    def _chunk_rows(self) -> int:
        return max(1, self.head_chunk_elements // max(self.embedding_dim, 1))

    # ------------------------------------------------------------------ lookup and head
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = token_ids(self, input_ids, self.codes.device)
        return scaled_rows(self, self.decode(flat)).reshape(*input_ids.shape, self.embedding_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x Êᵀ`` (the tied LM head): a packed kernel (CPU or Triton) for few tokens without gradient, else the
        vocabulary decoded one chunk at a time."""
        if not x.dtype.is_floating_point:
            raise TypeError("GroupQuantEmbedding.logits takes hidden states (a floating tensor)")
        if x.shape[-1] != self.embedding_dim:
            raise ValueError(f"GroupQuantEmbedding.logits: hidden size {x.shape[-1]}, expected {self.embedding_dim}")
        flat = x.reshape(-1, self.embedding_dim)
        if torch.is_grad_enabled() and (flat.requires_grad or self.scales_tuned):
            out = _ChunkedHead.apply(flat, self.scales, self.zeros, self)
        elif not self.scales_tuned and (kernel := group_head_kernel(self, flat)) is not None:
            out = kernel(self, flat)  # few tokens: the codes read in place (CPU or Triton kernel)
        else:
            out = self._head_forward(flat)
        return out.reshape(*x.shape[:-1], self.num_embeddings)

    def _head_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.num_embeddings, dtype=x.dtype, device=x.device)
        step = self._chunk_rows()
        for a in range(0, self.num_embeddings, step):
            out[:, a:a + step] = x @ self.decode(slice(a, a + step), x.dtype).to(x.device).T
        return out

    def _head_backward(self, grad: torch.Tensor, x: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of ``x Êᵀ`` for ``x`` and — given the forward's ``x`` — for the (tuned) scales and zeros: each
        chunk's ``∂L/∂Ê = gradᵀ x`` is pushed through that chunk's decode."""
        dx = torch.zeros(grad.shape[0], self.embedding_dim, dtype=grad.dtype, device=grad.device)
        d_scales = torch.zeros_like(self.scales, dtype=torch.float32) if x is not None else None
        d_zeros = torch.zeros_like(self.zeros, dtype=torch.float32) if x is not None else None
        step = self._chunk_rows()
        for a in range(0, self.num_embeddings, step):
            rows, g = slice(a, a + step), grad[:, a:a + step]
            if x is None:
                dx += g @ self.decode(rows, grad.dtype).to(grad.device)
                continue
            with torch.enable_grad():
                scales = self.scales[rows].detach().float().requires_grad_(True)
                zeros = self.zeros[rows].detach().float().requires_grad_(True)
                chunk = dequantize_groups(unpack_codes(self.codes[rows], self.embedding_dim, self.bits), scales,
                                          zeros, self.group_size, torch.float32)
                chunk.backward((g.T @ x).to(chunk.dtype))
            dx += g @ chunk.detach().to(device=grad.device, dtype=grad.dtype)
            d_scales[rows], d_zeros[rows] = scales.grad, zeros.grad
        return dx, d_scales, d_zeros

    def dense_module(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """An ``nn.Embedding`` (a :class:`ScaledEmbedding` when scaled) holding ``Ê`` (for ``dequantize()``)."""
        return ScaledEmbedding.holding(self, self.dequantize_weight(torch.float32), dtype or self.output_dtype)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, output_dtype={self.output_dtype}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""))


class _ChunkedHead(torch.autograd.Function):
    """``x Êᵀ`` with gradients for ``x`` and, when they are tuned, for ``scales`` and ``zeros`` (the codes are fixed),
    decoding the chunks again in the backward instead of keeping every decoded chunk alive for it (which would be
    the whole matrix). ``scales`` and ``zeros`` are inputs only so that autograd routes their gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,  # noqa: ANN001 - ctx
                embedding: GroupQuantEmbedding) -> torch.Tensor:
        ctx.embedding = embedding
        ctx.save_for_backward(x)
        return embedding._head_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001 - ctx
        (x,) = ctx.saved_tensors
        tuned = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, d_scales, d_zeros = ctx.embedding._head_backward(grad.contiguous(), x if tuned else None)
        return dx if ctx.needs_input_grad[0] else None, d_scales, d_zeros, None
