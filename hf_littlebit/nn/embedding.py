"""``LittleBitEmbedding``: a token embedding in the packed binary low-rank format, and the LM head that reuses it.

The embedding matrix ``E`` (vocab × hidden) is the weight of the LM head read the other way round, so it is stored
exactly as a :class:`~hf_littlebit.nn.layer.LittleBitLinear` with ``in_features = hidden`` and
``out_features = vocab`` stores its weight: ``E ≈ Σ_paths diag(h) sgn(U) diag(l) sgn(V) diag(g)`` with the same
tensor names, shapes and packing (``u_bits`` (vocab × ⌈r/32⌉), ``v_bits``, ``h``, ``l``, ``g``, ``res_*``). What
changes is the forward:

* **lookup** (``forward(input_ids)``): row ``i`` is ``h_i · (sgn(U)_i ⊙ l) · sgn(V) ⊙ g``, summed over the paths. Only
  the sign words of the requested rows are gathered and unpacked; ``sgn(V) ⊙ g`` (rank × hidden, small) is cached
  per device like the linear layer's unpacked signs. The vocab × hidden matrix is never built.
* **head** (:meth:`LittleBitEmbedding.logits`): the layer's ordinary linear forward through the backend dispatch, so
  the CPU kernel, Triton and the PyTorch reference all serve a tied LM head from the same stored words.

:class:`LittleBitTiedHead` is the LM head of a model whose head is tied to its embedding: it owns no tensor and
forwards to the embedding it was built with, so a checkpoint holds the packed tensors once.

Being a ``LittleBitLinear``, the embedding takes part in everything the package does with packed layers (summary,
trainable mode, backends, saving, the checkpoint checks) without a second implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends.dispatch import littlebit_forward
from ..format.packing import unpack_signs
from .layer import LittleBitLinear

__all__ = ["LittleBitEmbedding", "LittleBitTiedHead", "ScaledEmbedding", "dense_embed_scale"]


class LittleBitEmbedding(LittleBitLinear):
    """Packed binary low-rank ``nn.Embedding`` replacement (see the module docstring).

    ``output_dtype`` is the dtype of the looked-up vectors (the dtype of the dense embedding it replaces), held by
    the empty parameter ``dtype_tag`` so that it follows ``.to(dtype)`` / ``.half()`` like a weight would.
    ``embed_scale`` multiplies every looked-up vector, as Gemma's scaled embeddings do (``None``: no scaling).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        residual: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        output_dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_embeddings, rank, bias=False, residual=residual, scale_dtype=scale_dtype,
                         device=device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        # An empty tensor in the output dtype, registered *first*: Transformers takes a model's dtype from its first
        # floating parameter (written to config.json, used to pick the reload dtype), which would otherwise be this
        # layer's fp16 scale vector; it also follows .to(dtype) / .half() as a dense embedding's weight would.
        tag = nn.Parameter(torch.empty(0, dtype=output_dtype, device=device), requires_grad=False)
        self._parameters = {"dtype_tag": tag, **self._parameters}

    @property
    def output_dtype(self) -> torch.dtype:
        return self.dtype_tag.dtype

    @classmethod
    def like(cls, dense: nn.Embedding, rank: int, residual: bool, scale_dtype: torch.dtype,
             device: torch.device | str | None = None) -> LittleBitEmbedding:
        """An empty packed embedding with the shape, dtype, padding index and scale of ``dense``."""
        return cls(dense.num_embeddings, dense.embedding_dim, rank, residual=residual, scale_dtype=scale_dtype,
                   device=device, output_dtype=dense.weight.dtype, padding_idx=dense.padding_idx,
                   embed_scale=dense_embed_scale(dense))

    # ------------------------------------------------------------------ lookup
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = token_ids(self, input_ids, self.h.device)
        out = None
        for prefix in self.active_prefixes:
            rows = self.path_rows(prefix, flat)
            out = rows if out is None else out + rows
        return scaled_rows(self, out).reshape(*input_ids.shape, self.embedding_dim)

    def path_rows(self, prefix: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One path's rows ``h_i · (sgn(U)_i ⊙ l) · (sgn(V) ⊙ g)`` for the 1-D ``ids`` (n × hidden, in ``dtype``)."""
        h, l, g = (getattr(self, prefix + n) for n in ("h", "l", "g"))  # noqa: E741
        if self.is_trainable:  # latents through the sign estimator: differentiable in the scales (and latents)
            u_rows = self._sign_fn(getattr(self, prefix + "u_latent")[ids]).to(dtype)
            v_scaled = self._latent_sign(prefix + "v_latent", dtype) * g.to(dtype)
        else:
            u_rows = unpack_signs(getattr(self, prefix + "u_bits")[ids], self.rank, dtype)
            v_scaled = self.scaled_v(prefix, ids.device, dtype)
        return ((u_rows * l.to(dtype)) @ v_scaled) * h[ids].to(dtype)[:, None]

    def scaled_v(self, prefix: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``sgn(V) ⊙ g`` of one path (rank × hidden): unpacked once per (device, dtype), stamped like the signs."""
        v_bits, g = getattr(self, prefix + "v_bits"), getattr(self, prefix + "g")
        return self._sign_cache.get(("lookup_v", prefix, device, dtype), [v_bits, g], lambda: (
            unpack_signs(v_bits.to(device), self.in_features, dtype) * g.to(device=device, dtype=dtype)))

    # ------------------------------------------------------------------ head
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x Êᵀ``: the LM head over the same packed tensors (the layer's linear forward, any backend)."""
        return littlebit_forward(self, x)

    def dense_module(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """An ``nn.Embedding`` (a :class:`ScaledEmbedding` when scaled) holding ``Ê`` (for ``dequantize()``)."""
        return ScaledEmbedding.holding(self, self.dequantize_weight(torch.float32), dtype or self.output_dtype)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}, "
                f"residual={self.residual}, scale_dtype={self.scale_dtype}, output_dtype={self.output_dtype}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else "")
                + (f", trainable={self.sign_estimator}" if self.is_trainable else ""))


def dense_embed_scale(dense: nn.Embedding) -> float | None:
    """The constant a (Gemma-style) scaled ``nn.Embedding`` multiplies its rows by, ``None`` for a plain one."""
    scale = getattr(dense, "scalar_embed_scale", None)  # Gemma keeps the float next to a (meta) buffer
    if scale is None:
        buffer = getattr(dense, "embed_scale", None)
        if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
            scale = float(buffer)
        elif isinstance(buffer, int | float):
            scale = float(buffer)
    return None if scale is None else float(scale)


def token_ids(embedding: nn.Module, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``input_ids`` flattened onto ``device``, refused when they are not ids or (on CPU) out of range."""
    if input_ids.dtype.is_floating_point:
        raise TypeError(f"{type(embedding).__name__} looks up token ids (an integer tensor); for hidden states → "
                        "logits use .logits(x)")
    flat = input_ids.reshape(-1).to(device)
    # Indexing would wrap negative ids around; on accelerators the gather's own device assert catches them without
    # the host sync this check costs.
    if flat.device.type == "cpu" and flat.numel() and (int(flat.min()) < 0 or
                                                       int(flat.max()) >= embedding.num_embeddings):
        raise IndexError(f"token id out of range for an embedding of {embedding.num_embeddings} rows")
    return flat


def scaled_rows(embedding: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Looked-up rows in the embedding's output dtype, times its ``embed_scale`` when it has one."""
    out = rows.to(embedding.output_dtype)
    if embedding.embed_scale is not None:
        out = out * torch.tensor(embedding.embed_scale, dtype=out.dtype, device=out.device)
    return out


class LittleBitTiedHead(nn.Module):
    """The LM head of a tied model: ``logits = x Êᵀ`` from the stored tensors of ``embedding``, owning none itself.

    ``embedding`` is a packed embedding with a ``logits(x)`` method: a :class:`LittleBitEmbedding` or a
    :class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding`. It is referenced, not registered as a child, so
    the state dict (and the checkpoint) holds its tensors once, under the embedding's name; moving or converting the
    model moves them for both.
    """

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: no second copy in state_dict / parameters()

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the packed embedding"


class ScaledEmbedding(nn.Embedding):
    """``nn.Embedding`` times a constant (Gemma's scaled embedding), what a dequantized scaled embedding becomes."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 embed_scale: float | None = None, **kwargs) -> None:  # noqa: ANN003 - nn.Embedding's factory kwargs
        super().__init__(num_embeddings, embedding_dim, padding_idx, **kwargs)
        self.embed_scale = embed_scale

    @classmethod
    def holding(cls, packed: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> ScaledEmbedding:
        """The dense counterpart of a packed embedding (its shape, padding index and scale) holding ``weight``."""
        dense = cls(packed.num_embeddings, packed.embedding_dim, packed.padding_idx, packed.embed_scale,
                    device=weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
        return dense

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        if self.embed_scale is None:
            return out
        return out * torch.tensor(self.embed_scale, dtype=out.dtype, device=out.device)
