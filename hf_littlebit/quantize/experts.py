"""Fused MoE experts in the conversion: split them into per-expert ``nn.Linear``s before planning.

Once a fused experts module is split (:mod:`hf_littlebit.nn.experts`), each expert matrix is an ``nn.Linear`` named
``<experts>.gate_up_layers.<e>`` / ``.down_layers.<e>``, so planning, the rank rule, the global allocator, data-free
conversion and block-wise reconstruction treat experts exactly like every other Linear — and count every one of
them. The same split runs on the meta model before a checkpoint loads: quantize-on-load keeps the fused parameters
as targets for the checkpoint's (merged) tensors and :func:`quantize_fused_` packs them expert by expert; a reload
sizes the per-expert packed layers from the recorded ranks like any other layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..config import LittleBitConfig
from ..nn.experts import EXPERT_LAYER, FUSED_TO_LIST, LittleBitExperts, expert_weight, is_fused_experts, split_experts_
from .layers import quantize_layer_

__all__ = ["fused_experts", "quantize_fused_", "recorded_expert_modules", "split_model_experts_"]

def fused_experts(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """Fused (not yet split) experts modules that ``modules_to_not_convert`` does not exclude, by name."""
    return {name: m for name, m in model.named_modules()
            if is_fused_experts(m) and not isinstance(m, LittleBitExperts) and should_convert_module(name, skip)}


def recorded_expert_modules(layer_ranks: dict[str, int]) -> set[str]:
    """Experts modules that a checkpoint's ``layer_ranks`` converted (their expert layers are named there)."""
    return {m["module"] for m in map(EXPERT_LAYER.match, layer_ranks) if m}


def _linear_view(fused_name: str, expert: int, d_in: int, d_out: int, weight: torch.Tensor | None) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight is the expert's view of the fused tensor (meta when loading)."""
    if weight is None:
        return nn.Linear(d_in, d_out, bias=False, device="meta")
    layer = nn.Linear(d_in, d_out, bias=False, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def split_model_experts_(model: nn.Module, skip: list[str], keep_fused: bool = False,
                         only: set[str] | None = None) -> list[str]:
    """Split every convertible fused experts module of ``model`` into per-expert ``nn.Linear``s; returns their names.

    On a loaded model the Linears are views of the fused tensors (no copy). On the meta model of a checkpoint being
    loaded they are meta, and ``keep_fused`` keeps the fused parameters for the quantize-on-load op to receive.
    ``only`` restricts the split to those module names (a reload splits what the checkpoint's ranks name).
    """
    found = {n: m for n, m in fused_experts(model, skip).items() if only is None or n in only}
    for module in found.values():
        split_experts_(module, _linear_view, keep_fused=keep_fused)
    return list(found)


@torch.no_grad()
def quantize_fused_(module: LittleBitExperts, fused_name: str, weight: torch.Tensor, config: LittleBitConfig,
                    module_name: str, errors: dict[str, str]) -> list[str]:
    """Quantize-on-load: pack each expert of the checkpoint's fused ``weight`` into its layer, then drop the fused
    placeholder. Returns the names of the layers filled; failures are recorded in ``errors`` (name → message)."""
    list_name = FUSED_TO_LIST[fused_name]
    layers = getattr(module, list_name)
    if weight.shape[0] != len(layers):
        raise ValueError(f"{module_name}.{fused_name}: {weight.shape[0]} experts in the checkpoint, "
                         f"{len(layers)} in the model")
    names = []
    for e, layer in enumerate(layers):
        name = f"{module_name}.{list_name}.{e}"
        try:
            quantize_layer_(layer, expert_weight(weight, e, module.is_transposed), config, name)
        except ValueError as exc:
            errors[name] = str(exc)
        names.append(name)
    module._parameters.pop(fused_name, None)
    return names
