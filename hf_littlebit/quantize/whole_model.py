"""``whole_model=True``: the input embedding and the LM head are converted too, and ``bpw`` budgets every parameter.

Why: for small models with large vocabularies the embedding dominates what is left dense (SmolLM2-135M: the tied
49,152 × 576 embedding is 28 M of 135 M parameters, 8× all packed linears together at 0.55 bpw), so a "0.55 bpw"
model is really ~3.8 bits per parameter. Here:

* the embedding becomes a :class:`~hf_littlebit.nn.embedding.LittleBitEmbedding` (same factorisers, same packed
  format: the embedding matrix is factored as the weight of the head, vocab × hidden);
* a head tied to it becomes a :class:`~hf_littlebit.nn.embedding.LittleBitTiedHead` over the same packed tensors
  (recorded in ``config.tied_heads``; stored once); Transformers' own tie of ``lm_head.weight`` to the embedding
  weight is dropped from the model's tie tables, since neither tensor exists any more;
* an untied head is an ordinary ``nn.Linear`` and is converted like the others;
* with ``embedding_bits`` the embedding is stored in the few-bit group format instead
  (:class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding`, plan kind ``"group_embedding"``, no rank; its name
  recorded in ``config.group_embedding``): its true bits (codes, scales, zeros) are charged to the budget first,
  and only the rest is spent on the other matrices;
* the budget is ``bpw × (all parameters of the fp model)`` bits; the tensors that stay dense (norms, biases,
  buffers, skipped modules) are charged at the width they are stored in, and the rest is spent on the converted
  matrices: with ``allocation="uniform"`` at one common rate (the largest whose true total fits), with ``"auto"``
  by the global allocator (:mod:`hf_littlebit.quantize.allocate`) across linears, embedding and head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from ..config import LittleBitConfig
from ..errors import BudgetTooSmallError, LittleBitQuantizationError
from ..format.budget import choose_rank, dbf_rank, stored_bits
from ..format.group_quant import group_quant_bits
from ..nn.embedding import LittleBitEmbedding, LittleBitTiedHead
from ..nn.group_embedding import GroupQuantEmbedding
from .allocate import LayerShape, allocate_ranks, normalised_spectrum
from .layers import new_littlebit_layer, quantize_layer_
from .plan import LayerPlan

logger = logging.get_logger(__name__)

SAVED_TIES = "_littlebit_saved_ties"
GROUP_EMBEDDING = "group_embedding"  # LayerPlan.kind of an embedding in the few-bit group format


def find_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """Name and module of the model's input embedding; a clear error when there is none to convert."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if getter is not None else None
    if not isinstance(emb, nn.Embedding):
        raise LittleBitQuantizationError(
            f"whole_model=True converts the input embedding, but {type(model).__name__} has no nn.Embedding input "
            f"embedding (get_input_embeddings() gave {type(emb).__name__}); use whole_model=False for this model"
        )
    name = next(n for n, m in model.named_modules() if m is emb)
    return name, emb


def find_tied_head(model: nn.Module, emb_name: str, emb: nn.Embedding) -> str | None:
    """Name of the LM head whose weight is the embedding's (by identity, or by the model's tie table), else None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    head_name = next(n for n, m in model.named_modules() if m is head)
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    if getattr(head, "weight", None) is emb.weight or ties.get(f"{head_name}.weight") == f"{emb_name}.weight":
        return head_name
    return None


def group_embedding_plan(model: nn.Module, config: LittleBitConfig) -> LayerPlan | None:
    """The plan of the embedding in the group format (rank 0) when ``config.embedding_bits`` asks for it and the
    embedding is converted; else None."""
    if config.embedding_bits is None:
        return None
    name, emb = find_embedding(model)
    if not should_convert_module(name, config.modules_to_not_convert or []):
        return None
    return LayerPlan(name, emb.embedding_dim, emb.num_embeddings, 0, False, GROUP_EMBEDDING)


def group_embedding_bits(plan: LayerPlan, config: LittleBitConfig) -> int:
    """True stored bits of a ``"group_embedding"`` plan: code words, fp16 scales and zeros."""
    return group_quant_bits(plan.out_features, plan.in_features, config.embedding_bits, config.embedding_group_size)


def whole_model_budget(model: nn.Module, config: LittleBitConfig, linear_plans: list[LayerPlan]
                       ) -> tuple[list[LayerPlan], int, dict[str, str]]:
    """Every binary matrix's plan (linears, embedding, untied head; ranks not chosen yet), the bits left for them
    once the dense tensors (and a group-quantized embedding, :func:`group_embedding_plan`) are paid for, and
    ``{tied head: embedding}``. Shapes and dtypes only (works on meta)."""
    emb_name, emb = find_embedding(model)
    tied_head = find_tied_head(model, emb_name, emb)
    plans = [p for p in linear_plans if p.name != tied_head]
    skip = config.modules_to_not_convert or []
    if should_convert_module(emb_name, skip):
        if tied_head is not None and not should_convert_module(tied_head, skip):
            raise LittleBitQuantizationError(
                f"whole_model=True: {tied_head} is tied to the embedding {emb_name}, so it cannot stay dense while "
                f"the embedding is packed; keep both dense (add {emb_name} to modules_to_not_convert too) or convert "
                "both"
            )
        if config.embedding_bits is None:
            plans.append(LayerPlan(emb_name, emb.embedding_dim, emb.num_embeddings, config.min_rank, False,
                                   "embedding"))
    else:
        tied_head = None  # the embedding stays dense, and so does a head tied to it
    group = group_embedding_plan(model, config)
    converted = {id(model.get_submodule(p.name).weight) for p in [*plans, *([group] if group else [])]}
    total_params = sum(p.numel() for p in model.parameters())
    dense_bits = sum(8 * t.numel() * t.element_size() for t in _unique_tensors(model) if id(t) not in converted)
    logger.info(f"LittleBit whole model: {total_params:,} parameters, {dense_bits / 1e6:.2f} Mbit stay dense")
    budget = int(config.bpw * total_params) - dense_bits
    if group is not None:
        group_bits = group_embedding_bits(group, config)
        if group_bits >= budget:
            raise BudgetTooSmallError(
                f"whole_model=True, bpw={config.bpw}: the {config.embedding_bits}-bit embedding (groups of "
                f"{config.embedding_group_size}) alone stores {group_bits / 1e6:.2f} Mbit, and the budget after the "
                f"dense tensors is {max(budget, 0) / 1e6:.2f} Mbit, nothing left for the other matrices; raise bpw, "
                "lower embedding_bits, enlarge embedding_group_size or use the binary embedding (embedding_bits=None)"
            )
        budget -= group_bits
    return plans, budget, ({tied_head: emb_name} if tied_head else {})


def whole_model_plans(model: nn.Module, config: LittleBitConfig, linear_plans: list[LayerPlan]
                      ) -> tuple[list[LayerPlan], dict[str, str]]:
    """The plans of every converted matrix (linears, embedding, untied head) with ranks that fit the whole-model
    budget (a group-quantized embedding last, rank 0), and ``{tied head: embedding}``."""
    plans, budget, tied = whole_model_budget(model, config, linear_plans)
    scale_bits = torch.finfo(config.torch_scale_dtype).bits
    if config.allocation == "auto":
        shapes = [LayerShape(p.name, p.in_features, p.out_features,
                             normalised_spectrum(model.get_submodule(p.name).weight)) for p in plans]
        ranks = allocate_ranks(shapes, max(budget, 0), config.residual, min_rank=config.min_rank,
                               scale_bits=scale_bits)
    else:
        ranks = _uniform_ranks(plans, config, budget, scale_bits)
    used = sum(stored_bits(p.in_features, p.out_features, ranks[p.name], config.residual, scale_bits) for p in plans)
    logger.info(f"LittleBit whole model: {used / 1e6:.2f} of {budget / 1e6:.2f} Mbit spent on {len(plans)} matrices")
    plans = [LayerPlan(p.name, p.in_features, p.out_features, ranks[p.name], p.bias, p.kind) for p in plans]
    group = group_embedding_plan(model, config)
    return plans + ([group] if group is not None else []), tied


def record_plans(config: LittleBitConfig, plans: list[LayerPlan]) -> None:
    """Write what a reload needs into ``config``: the rank of every binary layer (``layer_ranks``) and the name of a
    group-quantized embedding (``group_embedding``)."""
    config.layer_ranks = {p.name: p.rank for p in plans if p.kind != GROUP_EMBEDDING}
    config.group_embedding = next((p.name for p in plans if p.kind == GROUP_EMBEDDING), None)


def _uniform_ranks(plans: list[LayerPlan], config: LittleBitConfig, budget: int, scale_bits: int) -> dict[str, int]:
    """The ranks of the rule at the largest common rate whose true total fits ``budget`` (bisection on the rate)."""
    rule = dbf_rank if config.method == "dbf" else choose_rank

    def ranks_at(rate: float) -> dict[str, int]:
        return {p.name: rule(p.in_features, p.out_features, rate, config.residual, factor=config.rank_factor(p.name),
                             min_rank=config.min_rank).rank for p in plans}

    def bits(ranks: dict[str, int]) -> int:
        return sum(stored_bits(p.in_features, p.out_features, ranks[p.name], config.residual, scale_bits)
                   for p in plans)

    lo, hi = 1e-6, 16.0
    if bits(ranks_at(lo)) > budget:
        raise BudgetTooSmallError(
            f"whole_model=True, bpw={config.bpw}: after the tensors that stay dense (norms, biases...)"
            f"{' and the group-quantized embedding' if config.embedding_bits else ''} the budget "
            f"leaves {max(budget, 0) / 1e6:.3f} Mbit for the converted matrices, less than min_rank={config.min_rank} "
            "in each needs; raise bpw, lower min_rank or use residual=False"
            + (" (or lower embedding_bits)" if config.embedding_bits else "")
        )
    if bits(ranks_at(hi)) <= budget:
        return ranks_at(hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if bits(ranks_at(mid)) <= budget else (lo, mid)
    logger.info(f"LittleBit whole model (uniform): every converted matrix at the rule's rate {lo:.4f} bpw")
    return ranks_at(lo)


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


def convert_late_(model: nn.Module, plans: list[LayerPlan], config: LittleBitConfig) -> None:
    """Factor and pack the whole-model extras (data-free): the embedding and an untied head (an ordinary Linear
    plan), then attach ``config.tied_heads``."""
    for plan in plans:
        dense = model.get_submodule(plan.name)
        layer = new_littlebit_layer(plan, config, dense, device=dense.weight.device)
        if isinstance(layer, GroupQuantEmbedding):
            layer.set_weight_(dense.weight)
        else:
            quantize_layer_(layer, dense.weight, config, plan.name)
        model.set_submodule(plan.name, layer)
    attach_tied_heads(model, config)


def attach_tied_heads(model: nn.Module, config: LittleBitConfig) -> None:
    """Put a :class:`LittleBitTiedHead` over its packed embedding for each entry of ``config.tied_heads`` and drop the
    tie from Transformers' tables (the tied ``weight`` tensors no longer exist; the head owns nothing to tie)."""
    for head, embedding in config.tied_heads.items():
        layer = model.get_submodule(embedding)
        if not isinstance(layer, LittleBitEmbedding | GroupQuantEmbedding):
            raise LittleBitQuantizationError(f"tied head {head}: {embedding} is not a packed embedding")
        model.set_submodule(head, LittleBitTiedHead(layer))
        _untie(model, (head, embedding))


def _untie(model: nn.Module, names: tuple[str, ...]) -> None:
    """Remove every tie entry touching ``names`` from the model's tie tables (originals kept for :func:`retie`)."""
    def touches(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    saved = model.__dict__.setdefault(SAVED_TIES, {})
    if hasattr(model, "all_tied_weights_keys"):
        saved.setdefault("", dict(model.all_tied_weights_keys))
        model.all_tied_weights_keys = {k: v for k, v in model.all_tied_weights_keys.items()
                                       if not (touches(k) or touches(v))}
    for prefix, module in model.named_modules():
        table = getattr(module, "_tied_weights_keys", None)
        if not isinstance(table, dict) or not table:
            continue
        pre = f"{prefix}." if prefix else ""
        kept = {k: v for k, v in table.items() if not (touches(pre + k) or touches(pre + v))}
        if kept != table:
            saved.setdefault(f"module:{prefix}", table)
            module._tied_weights_keys = kept


def retie(model: nn.Module) -> None:
    """Restore the tie tables :func:`_untie` changed (after ``dequantize()`` made the dense tie real again)."""
    saved = model.__dict__.pop(SAVED_TIES, None) or {}
    for key, table in saved.items():
        if key == "":
            model.all_tied_weights_keys = table
        else:
            module = model.get_submodule(key.removeprefix("module:"))
            module.__dict__.pop("_tied_weights_keys", None)  # back to the class's table
