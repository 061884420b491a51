"""Which ``nn.Linear``s of a Transformers model to convert, and with which rank.

From a full-precision model the rank follows from the bpw rule per layer (or, with ``allocation="auto"``, from one
model-wide budget spent by :mod:`hf_littlebit.quantize.allocate`); from a saved checkpoint the converted set and the
ranks are exactly those its config records. Shared by the HF quantizer, :func:`hf_littlebit.quantize` and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from ..config import LittleBitConfig
from ..errors import LittleBitCheckpointError
from ..eval.summary import unconverted_weights
from ..format.budget import choose_rank, dbf_rank, stored_bits
from .allocate import LayerShape, allocate_ranks, normalised_spectrum

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    rank: int
    bias: bool
    # or "embedding": an nn.Embedding (in = embedding_dim, out = num_embeddings) in the binary format; or
    # "group_embedding": the same in the few-bit group format (config.embedding_bits; rank 0, unused)
    kind: str = "linear"


def tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is tied to another tensor (converting them would break the tie)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied) | set(tied.values())
    return {k.removesuffix(".weight") for k in keys}


def resolve_modules_to_not_convert(model: nn.Module, config: LittleBitConfig, default_skips: list[str]) -> list[str]:
    """The user's list (or the defaults: LM head, output embedding), always plus tied modules; sorted.

    With ``whole_model`` the head and the embedding are converted too: the defaults are only the modules the model
    keeps in fp32, and tied modules are not skipped (:mod:`hf_littlebit.quantize.whole_model` handles the tie)."""
    if config.whole_model:
        keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return sorted(set(keep_fp32) if config.modules_to_not_convert is None else set(config.modules_to_not_convert))
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
        embeddings = {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
        for name, rank in config.layer_ranks.items():
            module = linears.get(name)
            if module is None and config.whole_model and name in embeddings:
                emb = embeddings[name]
                plans.append(LayerPlan(name, emb.embedding_dim, emb.num_embeddings, rank, False, "embedding"))
                continue
            if module is None:
                raise LittleBitCheckpointError(
                    f"quantization_config.layer_ranks names {name!r}, which is not an nn.Linear of "
                    f"{type(model).__name__}; the checkpoint does not belong to this architecture"
                )
            plans.append(LayerPlan(name, module.in_features, module.out_features, rank, module.bias is not None))
        group = getattr(config, "group_embedding", None)  # whole_model with embedding_bits: no rank recorded
        if group is not None:
            if group not in embeddings:
                raise LittleBitCheckpointError(
                    f"quantization_config.group_embedding names {group!r}, which is not an nn.Embedding of "
                    f"{type(model).__name__}; the checkpoint does not belong to this architecture"
                )
            emb = embeddings[group]
            plans.append(LayerPlan(group, emb.embedding_dim, emb.num_embeddings, 0, False, "group_embedding"))
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
    if config.whole_model:  # these ranks are provisional: whole_model_plans re-chooses them under the model budget
        floored, capped = [], []
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


def warn_unconverted(model: nn.Module, plans: list[LayerPlan], skip: list[str]) -> dict[str, int]:
    """Say by name which large weights stay dense although nothing asked for it (LittleBit converts ``nn.Linear`` and
    fused MoE experts only), instead of reporting a bpw that silently covers part of the model. Returns them
    (name → parameters)."""
    found = unconverted_weights(model, (p.name for p in plans), skip)
    if found:
        total = sum(p.numel() for p in model.parameters())
        share = sum(found.values()) / total if total else 0.0
        first = next(iter(found))
        owner = type(model.get_submodule(first.rpartition(".")[0])).__name__ if "." in first else type(model).__name__
        logger.warning(
            f"LittleBit: {len(found)} weight tensor(s) with {share:.0%} of the model's parameters are not nn.Linear "
            f"and stay in full precision, e.g. {first} ({owner}). Fused MoE experts are converted (one packed layer "
            "per expert); MoE routers and other non-Linear weights are not, and the reported bpw covers the converted "
            "layers only (hf_littlebit.summary lists what stays dense)."
        )
    return found


def auto_budget_bits(plans: list[LayerPlan], config: LittleBitConfig) -> int:
    """The model-wide budget of ``allocation="auto"``: ``config.bpw`` true bits per weight of the converted layers."""
    return int(config.bpw * sum(p.in_features * p.out_features for p in plans))


def allocate_plans(model: nn.Module, plans: list[LayerPlan], config: LittleBitConfig) -> list[LayerPlan]:
    """``allocation="auto"``: re-choose the ranks of ``plans`` under one budget of ``config.bpw`` true bits per
    weight of the converted layers, from each loaded weight's spectrum (:mod:`hf_littlebit.quantize.allocate`)."""
    shapes = [LayerShape(p.name, p.in_features, p.out_features,
                         normalised_spectrum(model.get_submodule(p.name).weight)) for p in plans]
    budget = auto_budget_bits(plans, config)
    ranks = allocate_ranks(shapes, budget, config.residual, min_rank=config.min_rank)
    used = sum(stored_bits(p.in_features, p.out_features, ranks[p.name], config.residual) for p in plans)
    logger.info(f"LittleBit auto allocation: {len(plans)} layers, ranks {min(ranks.values())}–{max(ranks.values())}, "
                f"{used / 1e6:.2f} of {budget / 1e6:.2f} Mbit")
    return [LayerPlan(p.name, p.in_features, p.out_features, ranks[p.name], p.bias) for p in plans]
