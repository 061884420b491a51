"""The dense remainder of a packed model and the dtype it is saved in.

Everything a LittleBit checkpoint holds outside the packed modules — the embedding and LM head (unless
``whole_model``), norms, biases of unconverted layers, layers kept dense — is stored at the width the model holds it
in. A model quantized in fp32 (the fast dtype on a CPU) therefore writes its 16-bit-worthy remainder at 32 bits: on
SmolLM2-135M at 0.55 bpw a 121 MB checkpoint instead of 64 MB with the remainder in bf16.
``LittleBitConfig(dense_save_dtype=...)`` casts the remainder when saving; the packed tensors (bits, fp16 scales,
group codes) keep their own format, tied tensors stay one tensor, and the model in memory is untouched
(:func:`round_dense_remainder_` makes it equal to what is saved, for a caller who measures the model before saving
it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.group_embedding import GroupQuantEmbedding
from ..nn.layer import LittleBitLinear

#: the modules whose tensors are a packed format of their own (everything else is the dense remainder)
PACKED_MODULES = (LittleBitLinear, GroupQuantEmbedding)


def _packed_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, PACKED_MODULES) and name)


def _is_dense(key: str, tensor: object, packed: tuple[str, ...], dtype: torch.dtype) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != dtype
            and not key.startswith(packed) and tensor.device.type != "meta")


def cast_dense_remainder(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                         ) -> dict[str, torch.Tensor]:
    """``state`` (a state dict of ``model``) with every floating tensor outside the packed modules cast to ``dtype``;
    tensors sharing storage (tied weights) are cast once and stay shared, so the saver still stores them once."""
    packed = _packed_prefixes(model)
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        if not _is_dense(key, tensor, packed, dtype):
            out[key] = tensor
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in cast:
            cast[ident] = tensor.detach().to(dtype)
        out[key] = cast[ident]
    return out


def round_dense_remainder_(model: nn.Module, dtype: torch.dtype) -> int:
    """Round the saved dense remainder's tensors (what :func:`cast_dense_remainder` casts; non-persistent buffers
    are not saved and stay as they are) to ``dtype`` *in place*, keeping their dtype, so the model computes exactly
    what its ``dense_save_dtype`` checkpoint computes after a reload in the model's dtype. Returns how many tensors
    changed."""
    packed = _packed_prefixes(model)
    seen, changed = set(), 0
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen or not _is_dense(key, t, packed, dtype):
                continue
            seen.add(id(t))
            rounded = t.to(dtype).to(t.dtype)
            if not torch.equal(rounded, t):
                t.copy_(rounded)
                changed += 1
    return changed
