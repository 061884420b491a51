"""Bit budget of a LittleBit layer: the paper's rank rule and the true number of stored bits.

The rank rule (METHODS.md §1.5) charges, per path, ``r (d_in + d_out)`` sign bits, ``16 r`` bits for the latent
scale and ``16 (d_in + d_out)`` bits for the row/column scales; the float rank is multiplied by a per-module
factor (the paper's ``kv_factor``), truncated, rounded *down* to a multiple of 8 and floored at ``min_rank``.

The rule is what the papers report, but it ignores the 32-bit row padding of the packed signs. What a user pays
for is :func:`stored_bits`: every sign word including padding plus every scale vector at its real width. Both
are reported side by side by :func:`hf_littlebit.summary`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .packing import WORD_BITS, packed_width

RANK_MULTIPLE = 8
PAPER_SCALE_BITS = 16


@dataclass(frozen=True)
class RankChoice:
    """The rank picked for one layer and why."""

    rank: int
    rank_from_budget: int  # what the rule gave before the floor / cap
    floored: bool  # min_rank raised the rank (layer too small for the target)
    capped: bool  # the rank was limited to min(d_in, d_out)


def rank_float(d_in: int, d_out: int, bpw: float, residual: bool) -> float:
    """Real-valued rank per path that the paper's accounting allows for a ``bpw`` target."""
    if residual:
        return (bpw * d_in * d_out - 32 * (d_in + d_out)) / (2 * (d_in + d_out + 16))
    return (bpw * d_in * d_out - 16 * (d_in + d_out)) / (d_in + d_out + 16)


def budget_rank(d_in: int, d_out: int, bpw: float, residual: bool, factor: float = 1.0) -> int:
    """The float rank times the module's factor, truncated and rounded down to a multiple of 8 (may be ≤ 0)."""
    raw = int(rank_float(d_in, d_out, bpw, residual) * factor)  # int() truncates toward zero, as the repo does
    return (raw // RANK_MULTIPLE) * RANK_MULTIPLE


def paper_rank(d_in: int, d_out: int, bpw: float, residual: bool, factor: float = 1.0, min_rank: int = 8) -> int:
    """The rank rule exactly as the LittleBit code applies it (floored at ``min_rank``, no cap)."""
    return max(budget_rank(d_in, d_out, bpw, residual, factor), min_rank)


def choose_rank(
    d_in: int, d_out: int, bpw: float, residual: bool, factor: float = 1.0, min_rank: int = 8
) -> RankChoice:
    """Rank used by hf_littlebit: the paper's rule, capped at ``min(d_in, d_out)``.

    A rank above the smaller dimension adds bits without adding information for SVD-based factorisers (the
    extra latent directions are zero), so it is capped; the caller warns when the floor or the cap bind.
    """
    raw = budget_rank(d_in, d_out, bpw, residual, factor)
    rank = max(raw, min_rank)
    limit = min(d_in, d_out)
    return RankChoice(rank=min(rank, limit), rank_from_budget=raw, floored=raw < min_rank, capped=rank > limit)


def dbf_rank(
    d_in: int, d_out: int, bpw: float, residual: bool, factor: float = 1.0, min_rank: int = 8
) -> RankChoice:
    """DBF's middle dimension (METHODS.md §6.1): ``⌊bpw · d_in d_out / (d_in + d_out)⌋``, split over the paths.

    The rule charges only the sign bits (the scale vectors are free), does not round to a multiple of 8 and is not
    capped at ``min(d_in, d_out)``: DBF optimises the signs directly, so a middle dimension above the smaller side
    still adds accuracy (that is how DBF reaches 2 bpw and beyond).
    """
    paths = 2 if residual else 1
    raw = int(bpw * d_in * d_out / (d_in + d_out) / paths * factor)
    return RankChoice(rank=max(raw, min_rank), rank_from_budget=raw, floored=raw < min_rank, capped=False)


def paper_bpw(d_in: int, d_out: int, rank: int, residual: bool) -> float:
    """Bits per weight as the paper accounts them (no padding, one 16-bit latent vector per path)."""
    paths = 2 if residual else 1
    return paths * (rank * (d_in + d_out + 16) + 16 * (d_in + d_out)) / (d_in * d_out)


def stored_bits(d_in: int, d_out: int, rank: int, residual: bool, scale_bits: int = PAPER_SCALE_BITS) -> int:
    """Bits the packed layer really stores: sign words including padding plus the h, l, g vectors (no bias)."""
    paths = 2 if residual else 1
    sign_bits = (d_out * packed_width(rank) + rank * packed_width(d_in)) * WORD_BITS
    return paths * (sign_bits + scale_bits * (d_out + rank + d_in))


def true_bpw(d_in: int, d_out: int, rank: int, residual: bool, scale_bits: int = PAPER_SCALE_BITS) -> float:
    """:func:`stored_bits` per weight of the dense layer it replaces."""
    return stored_bits(d_in, d_out, rank, residual, scale_bits) / (d_in * d_out)


def is_valid_bpw(bpw: object) -> bool:
    """True for a real number in (0, 16]."""
    return isinstance(bpw, (int, float)) and not isinstance(bpw, bool) and math.isfinite(bpw) and 0 < bpw <= 16
