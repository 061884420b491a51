"""Building packed layers for a plan: the configured factoriser on one dense weight, packed (or kept trainable).

The per-layer seed is derived from the config's seed and the layer's name, so a layer gets the same factors however
it is reached (quantize on load, in place, block by block) and in whatever order.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from transformers.utils import logging

from ..config import LittleBitConfig
from ..factorize import FactorPath, factorize
from ..nn.embedding import LittleBitEmbedding
from ..nn.experts import expert_group
from ..nn.group_embedding import GroupQuantEmbedding
from ..nn.layer import LittleBitLinear
from .plan import LayerPlan

logger = logging.get_logger(__name__)


def replace_linears(model: nn.Module, plans: list[LayerPlan], config: LittleBitConfig, with_fp_weight: bool) -> None:
    """Swap each planned ``nn.Linear`` for an empty ``LittleBitLinear`` on the meta device.

    Expert layers never get an fp ``weight`` placeholder: the checkpoint holds their fused tensor, which reaches the
    experts module itself (:func:`hf_littlebit.quantize.experts.quantize_fused_`)."""
    for plan in plans:
        dense = model.get_submodule(plan.name)
        placeholder = with_fp_weight and expert_group(plan.name) is None
        model.set_submodule(plan.name, new_littlebit_layer(plan, config, dense, "meta", placeholder))


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed: stable across processes (unlike ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def factorize_for_layer(weight: torch.Tensor, plan: LayerPlan | LittleBitLinear, config: LittleBitConfig,
                        name: str | None = None, input_importance: torch.Tensor | None = None,
                        output_importance: torch.Tensor | None = None) -> list[FactorPath]:
    """The configured method's factor paths (with continuous latents) for one layer's dense ``weight``.

    ``input_importance`` (mean squared input per channel, from calibration) is used when the config is
    ``activation_aware``; ``output_importance`` (the output-gradient Fisher diagonal, ``calibration_fisher``)
    whenever it is given."""
    name = name or getattr(plan, "name", "weight")
    return factorize(
        weight, plan.rank, method=config.method, residual=config.residual,
        seed=layer_seed(config.seed, name), scale_dtype=config.torch_scale_dtype, name=name,
        options=config.factorizer_options(),
        input_importance=input_importance if config.activation_aware else None,
        output_importance=output_importance,
    )


def note_data_free(config: LittleBitConfig) -> None:
    """Say that an activation-aware config falls back to unweighted factorisation without calibration data."""
    if config.activation_aware:
        logger.warning(
            f"LittleBit: method={config.method!r} is activation-aware but no calibration data was given, so the "
            "layers are factorised unweighted (weight error instead of output error). Pass calibration='default' "
            "(or your own text) to weight them, or activation_aware=False to silence this."
        )


def quantize_layer_(module: LittleBitLinear, weight: torch.Tensor, config: LittleBitConfig, name: str) -> None:
    """Factor ``weight`` with the configured method and pack the result into ``module``.

    With ``config.trainable`` the factoriser's continuous latents seed trainable mode instead (better than signs).
    """
    paths = factorize_for_layer(weight, module, config, name)
    if config.trainable:
        module.make_trainable_(paths, estimator=config.sign_estimator, alpha=config.smoothsign_alpha)
    else:
        module.set_factors_(paths)


def new_littlebit_layer(
    plan: LayerPlan, config: LittleBitConfig, dense: nn.Linear | nn.Embedding, device: torch.device | str | None = None,
    with_fp_weight: bool = False,
) -> LittleBitLinear | GroupQuantEmbedding:
    """An empty (zero) frozen ``LittleBitLinear`` for ``plan`` on ``device``, carrying ``dense``'s bias (not on the
    meta device). ``with_fp_weight`` keeps a meta ``weight`` placeholder for the quantize-on-load op. An
    ``"embedding"`` plan gives a :class:`LittleBitEmbedding` shaped like ``dense`` (never with a placeholder:
    whole-model conversion runs after loading), a ``"group_embedding"`` plan an empty :class:`GroupQuantEmbedding`."""
    if plan.kind == "group_embedding":  # the few-bit group format (config.embedding_bits): no rank, no backend
        return GroupQuantEmbedding.like(dense, config.embedding_bits, config.embedding_group_size,
                                        device=device).requires_grad_(False)
    if plan.kind == "embedding":
        emb = LittleBitEmbedding.like(dense, plan.rank, config.residual, config.torch_scale_dtype, device=device)
        emb.backend = config.backend
        return emb.requires_grad_(False)
    layer = LittleBitLinear(
        plan.in_features, plan.out_features, plan.rank, bias=plan.bias, residual=config.residual,
        scale_dtype=config.torch_scale_dtype, device=device,
        bias_dtype=dense.bias.dtype if dense.bias is not None else None,
        with_fp_weight=with_fp_weight, weight_dtype=dense.weight.dtype,
    )
    layer.backend = config.backend
    layer.requires_grad_(False)
    if dense.bias is not None and not layer.bias.is_meta and not dense.bias.is_meta:
        with torch.no_grad():
            layer.bias.copy_(dense.bias)
    return layer
