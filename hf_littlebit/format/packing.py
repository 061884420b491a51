"""Bit packing of ±1 sign matrices into int32 words.

Format (METHODS.md §3.1): each row is cut into groups of 32 consecutive columns; column ``j`` of a group goes to
bit ``j`` of one int32 word (LSB first, so column 31 is the two's-complement sign bit); bit value 1 means ``-1``
and 0 means ``+1``; rows are padded on the right with ``+1`` (zero bits) up to a multiple of 32. A matrix of shape
``(rows, cols)`` therefore packs to ``(rows, ceil(cols / 32))`` int32 words.

The packer works on any real tensor and takes the sign with ``sgn(0) = +1``, so latent float factors can be packed
directly. Unpacking uses an arithmetic *right* shift followed by ``& 1``; the upstream unpacker shifted left and
lost every ``-1`` outside column 0 (METHODS.md F1), which is why the round trip is tested exhaustively.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def packed_width(cols: int) -> int:
    """Number of int32 words needed for ``cols`` signs."""
    return (cols + WORD_BITS - 1) // WORD_BITS


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of a 2-D tensor (``x < 0`` → bit 1) into int32 words along its last dimension."""
    if x.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    words = packed_width(cols)
    bits = torch.zeros(rows, words * WORD_BITS, dtype=torch.int64, device=x.device)
    bits[:, :cols] = (x < 0).to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=x.device) << torch.arange(
        WORD_BITS, dtype=torch.int64, device=x.device
    )
    unsigned = (bits.view(rows, words, WORD_BITS) * weights).sum(dim=-1)  # in [0, 2**32)
    signed = torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned)
    return signed.to(torch.int32)


def unpack_signs(packed: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``(rows, words)`` int32 → ``(rows, cols)`` matrix of ±1 in ``dtype``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_signs expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, words = packed.shape
    if words != packed_width(cols):
        raise ValueError(f"{words} packed words cannot hold {cols} columns (expected {packed_width(cols)})")
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; & 1 keeps only the wanted bit
    signs = 1 - 2 * bits.reshape(rows, words * WORD_BITS)[:, :cols]
    return signs.to(dtype)
