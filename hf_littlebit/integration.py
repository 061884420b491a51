"""Glue between a Transformers model and the packed layer: which Linears to convert, with which rank, and how.

Used by the HF quantizer (quantize on load and reload of saved checkpoints); kept free of ``HfQuantizer`` so that
other entry points (in-place quantization, tools) can share it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from .allocate import LayerShape, allocate_ranks, normalised_spectrum
from .budget import choose_rank, dbf_rank, stored_bits
from .config import LittleBitConfig
from .factorize import FactorPath, factorize
from .layer import LittleBitLinear

logger = logging.get_logger(__name__)

_SAFETENSORS_DTYPES = {
    torch.int32: "I32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


class LittleBitCheckpointError(ValueError):
    """A saved littlebit checkpoint does not match its own configuration."""


@dataclass(frozen=True)
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    rank: int
    bias: bool


def tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is tied to another tensor (converting them would break the tie)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied) | set(tied.values())
    return {k.removesuffix(".weight") for k in keys}


def resolve_modules_to_not_convert(model: nn.Module, config: LittleBitConfig, default_skips: list[str]) -> list[str]:
    """The user's list (or the defaults: LM head, output embedding), always plus tied modules; sorted."""
    skip = set(default_skips) if config.modules_to_not_convert is None else set(config.modules_to_not_convert)
    skip |= tied_module_names(model)
    return sorted(skip)


def plan_conversion(model: nn.Module, config: LittleBitConfig, skip: list[str], pre_quantized: bool) -> list[LayerPlan]:
    """Every Linear to convert and its rank.

    From a full-precision model the rank follows from the rule (with warnings where ``min_rank`` or the layer's
    size bind); from a saved checkpoint the converted set and the ranks are exactly those recorded in the config.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    plans = []
    if pre_quantized:
        if not config.layer_ranks:
            raise LittleBitCheckpointError(
                "this littlebit checkpoint records no layer ranks in its quantization_config; it is corrupt or was "
                "written by an incompatible tool. Re-quantize the full-precision model."
            )
        for name, rank in config.layer_ranks.items():
            module = linears.get(name)
            if module is None:
                raise LittleBitCheckpointError(
                    f"quantization_config.layer_ranks names {name!r}, which is not an nn.Linear of "
                    f"{type(model).__name__}; the checkpoint does not belong to this architecture"
                )
            plans.append(LayerPlan(name, module.in_features, module.out_features, rank, module.bias is not None))
        return plans

    floored, capped = [], []
    for name, module in linears.items():
        if not should_convert_module(name, skip):
            continue
        rule = dbf_rank if config.method == "dbf" else choose_rank
        choice = rule(
            module.in_features, module.out_features, config.bpw, config.residual,
            factor=config.rank_factor(name), min_rank=config.min_rank,
        )
        if choice.floored:
            floored.append(name)
        if choice.capped:
            capped.append(name)
        plans.append(LayerPlan(name, module.in_features, module.out_features, choice.rank, module.bias is not None))
    if floored:
        logger.warning(
            f"LittleBit: {len(floored)} layer(s) are too small for bpw={config.bpw} and use min_rank={config.min_rank} "
            f"instead (their true bpw is higher than the target), e.g. {floored[0]}"
        )
    if capped:
        logger.warning(
            f"LittleBit: {len(capped)} layer(s) would need a rank above min(in, out) for bpw={config.bpw}; "
            f"the rank is capped there (fewer bits than the target), e.g. {capped[0]}"
        )
    return plans


def auto_budget_bits(plans: list[LayerPlan], config: LittleBitConfig) -> int:
    """The model-wide budget of ``allocation="auto"``: ``config.bpw`` true bits per weight of the converted layers."""
    return int(config.bpw * sum(p.in_features * p.out_features for p in plans))


def allocate_plans(model: nn.Module, plans: list[LayerPlan], config: LittleBitConfig) -> list[LayerPlan]:
    """``allocation="auto"``: re-choose the ranks of ``plans`` under one budget of ``config.bpw`` true bits per
    weight of the converted layers, from each loaded weight's spectrum (:mod:`hf_littlebit.allocate`)."""
    shapes = [LayerShape(p.name, p.in_features, p.out_features,
                         normalised_spectrum(model.get_submodule(p.name).weight)) for p in plans]
    budget = auto_budget_bits(plans, config)
    ranks = allocate_ranks(shapes, budget, config.residual, min_rank=config.min_rank)
    used = sum(stored_bits(p.in_features, p.out_features, ranks[p.name], config.residual) for p in plans)
    logger.info(f"LittleBit auto allocation: {len(plans)} layers, ranks {min(ranks.values())}–{max(ranks.values())}, "
                f"{used / 1e6:.2f} of {budget / 1e6:.2f} Mbit")
    return [LayerPlan(p.name, p.in_features, p.out_features, ranks[p.name], p.bias) for p in plans]


def replace_linears(model: nn.Module, plans: list[LayerPlan], config: LittleBitConfig, with_fp_weight: bool) -> None:
    """Swap each planned ``nn.Linear`` for an empty ``LittleBitLinear`` on the meta device."""
    for plan in plans:
        old = model.get_submodule(plan.name)
        new = LittleBitLinear(
            plan.in_features, plan.out_features, plan.rank, bias=plan.bias, residual=config.residual,
            scale_dtype=config.torch_scale_dtype, device="meta",
            bias_dtype=old.bias.dtype if old.bias is not None else None,
            with_fp_weight=with_fp_weight, weight_dtype=old.weight.dtype,
        )
        new.backend = config.backend
        new.requires_grad_(False)
        model.set_submodule(plan.name, new)


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed: stable across processes (unlike ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def factorize_for_layer(weight: torch.Tensor, plan: LayerPlan | LittleBitLinear, config: LittleBitConfig,
                        name: str | None = None, input_importance: torch.Tensor | None = None) -> list[FactorPath]:
    """The configured method's factor paths (with continuous latents) for one layer's dense ``weight``.

    ``input_importance`` (mean squared input per channel, from calibration) is used when the config is
    ``activation_aware``."""
    name = name or getattr(plan, "name", "weight")
    return factorize(
        weight, plan.rank, method=config.method, residual=config.residual,
        seed=layer_seed(config.seed, name), scale_dtype=config.torch_scale_dtype, name=name,
        options=config.factorizer_options(),
        input_importance=input_importance if config.activation_aware else None,
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
    plan: LayerPlan, config: LittleBitConfig, dense: nn.Linear, device: torch.device | str | None = None
) -> LittleBitLinear:
    """An empty (zero) ``LittleBitLinear`` for ``plan`` on ``device``, carrying ``dense``'s bias."""
    layer = LittleBitLinear(
        plan.in_features, plan.out_features, plan.rank, bias=plan.bias, residual=config.residual,
        scale_dtype=config.torch_scale_dtype, device=device,
        bias_dtype=dense.bias.dtype if dense.bias is not None else None,
    )
    layer.backend = config.backend
    layer.requires_grad_(False)
    if dense.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(dense.bias)
    return layer


def check_checkpoint_tensors(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Refuse a checkpoint whose packed tensors are missing or shaped differently from what its config implies.

    Reads only the safetensors headers, before any weight is loaded, so a mismatch is never zero-filled or
    re-initialised by the loader.
    """
    if not checkpoint_files:
        return
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise LittleBitCheckpointError(f"littlebit checkpoints are read from safetensors only, got {path}")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                header[key] = (tuple(sl.get_shape()), sl.get_dtype())
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, LittleBitLinear):
            continue
        for tensor, (shape, dtype) in module.expected_tensors().items():
            key = f"{name}.{tensor}"
            if key not in header:
                problems.append(f"{key}: missing")
            elif header[key] != (shape, _SAFETENSORS_DTYPES[dtype]):
                problems.append(f"{key}: found {header[key][1]}{list(header[key][0])}, expected "
                                f"{_SAFETENSORS_DTYPES[dtype]}{list(shape)}")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise LittleBitCheckpointError(
            f"littlebit checkpoint does not match its quantization_config ({len(problems)} problem(s)):\n  {shown}\n"
            "The packed tensors and the recorded ranks disagree; the folder is corrupt or was edited. "
            "Re-save it from the model, or re-quantize the full-precision checkpoint."
        )


def littlebit_layers(model: nn.Module) -> dict[str, LittleBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LittleBitLinear)}

