"""Global bit allocation: one model-wide budget of true bits, ranks distributed by measured sensitivity.

The uniform rule gives every layer the rank that its own shape allows at the target bpw. Layers differ, though: a
layer whose spectrum decays fast loses little when its rank shrinks, one with a flat spectrum loses a lot. The
allocator starts every layer at ``min_rank`` and repeatedly grants one rank step (8) to the layer whose step removes
the most relative error per stored bit, until the next step would exceed the budget:

* error removed by a step = the share of the layer's squared Frobenius norm carried by the singular values the step
  adds (``σ_i² / Σσ²``; with two paths, each rank step adds two directions). This is the fp low-rank proxy of the
  binary factorisation's error, normalised per layer so that a layer's arbitrary weight scale (absorbed by the norms
  around it) does not matter;
* bits of a step = the true stored bits of the layer at the new rank minus at the old one
  (:func:`hf_littlebit.format.budget.stored_bits`: sign words with their padding and every scale vector).

The marginal gains of a layer never increase (singular values are sorted), so this greedy choice is optimal for
the proxy, and it is deterministic (ties broken by layer name). The total never exceeds the budget, to the bit.
Plain tensors and numbers: nothing here knows about modules.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import BudgetTooSmallError
from ..format.budget import RANK_MULTIPLE, stored_bits


@dataclass(frozen=True)
class LayerShape:
    """What the allocator needs of one layer: its shape and its normalised squared spectrum (descending)."""

    name: str
    d_in: int
    d_out: int
    energy: torch.Tensor  # σ_i² / Σσ², float64, length min(d_in, d_out)


def normalised_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """``σ_i² / Σ σ²`` of ``weight`` in float64 on the CPU (zeros for an all-zero weight)."""
    s = torch.linalg.svdvals(weight.detach().float()).double().cpu()
    sq = s * s
    total = sq.sum()
    return sq / total if total > 0 else sq


def min_rank_bits(dims: Iterable[tuple[int, int]], residual: bool, min_rank: int = 8, scale_bits: int = 16) -> int:
    """True bits of ``min_rank`` in every ``(d_in, d_out)`` layer: the floor any model-wide budget must cover."""
    return sum(stored_bits(d_in, d_out, min_rank, residual, scale_bits) for d_in, d_out in dims)


def allocate_ranks(
    layers: list[LayerShape],
    budget_bits: int,
    residual: bool,
    min_rank: int = 8,
    step: int = RANK_MULTIPLE,
    scale_bits: int = 16,
) -> dict[str, int]:
    """Ranks (multiples of ``step`` above ``min_rank``) whose total true storage is ≤ ``budget_bits``.

    Raises :class:`BudgetTooSmallError` when even ``min_rank`` everywhere does not fit.
    """
    paths = 2 if residual else 1
    ranks = {layer.name: min_rank for layer in layers}
    used = min_rank_bits(((lay.d_in, lay.d_out) for lay in layers), residual, min_rank, scale_bits)
    if used > budget_bits:
        raise BudgetTooSmallError(
            f"allocation='auto': {budget_bits / 1e6:.2f} Mbit cannot hold even min_rank={min_rank} in every layer "
            f"({used / 1e6:.2f} Mbit); raise bpw, lower min_rank, use residual=False (one path costs half) or "
            "allocation='uniform' (--allocation uniform)"
        )

    def candidate(layer: LayerShape) -> tuple[float, str, int] | None:
        r = ranks[layer.name]
        limit = min(layer.d_in, layer.d_out)
        if r + step > limit:
            return None
        gain = layer.energy[paths * r: paths * (r + step)].sum().item()
        cost = (stored_bits(layer.d_in, layer.d_out, r + step, residual, scale_bits)
                - stored_bits(layer.d_in, layer.d_out, r, residual, scale_bits))
        return (-gain / cost, layer.name, cost)

    by_name = {layer.name: layer for layer in layers}
    heap = [c for c in (candidate(layer) for layer in layers) if c is not None]
    heapq.heapify(heap)
    while heap:
        _, name, cost = heapq.heappop(heap)
        if used + cost > budget_bits:
            continue  # this step does not fit; a cheaper one of another layer still might
        ranks[name] += step
        used += cost
        nxt = candidate(by_name[name])
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks
