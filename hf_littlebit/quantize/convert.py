"""Converting a loaded full-precision model in place: plan, allocate, then quantize data-free layer by layer or
calibrated block by block. Shared by :func:`hf_littlebit.quantize` and the HF quantizer's after-load path; it marks
nothing as quantized (that is the integration's job)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils import logging

from ..config import LittleBitConfig
from ..nn.layer import littlebit_layers
from .calibration import calibration_tokens, describe_source
from .experts import split_model_experts_
from .layers import new_littlebit_layer, note_data_free, quantize_layer_
from .plan import LayerPlan, allocate_plans, plan_conversion, resolve_modules_to_not_convert, warn_unconverted
from .reconstruct.driver import BlockReconstructor
from .reconstruct.options import ReconstructionOptions, ReconstructionResult
from .whole_model import GROUP_EMBEDDING, convert_late_, record_plans, whole_model_plans


def _default_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved with the model (its folder or Hub id)."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError(
            "calibration text needs a tokenizer: pass tokenizer=... to hf_littlebit.quantize, or token ids as "
            "calibration data"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"calibration text needs a tokenizer and none could be loaded from {path!r} ({exc}); pass "
            "tokenizer=... or token ids as calibration data"
        ) from exc


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    return getattr(text_cfg, "max_position_embeddings", None)


def convert_model_(
    model: nn.Module,
    config: LittleBitConfig,
    calibration: Any = None,
    tokenizer: Any = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> ReconstructionResult | None:
    """Replace every planned ``nn.Linear`` of a loaded fp model by a packed layer; shared by :func:`quantize` and the
    HF quantizer's calibrated path. Returns the reconstruction report when calibrating.

    With ``config.whole_model`` the embedding and the LM head are planned and budgeted with the linears
    (:mod:`hf_littlebit.quantize.whole_model`) but converted last: after the block-wise pass (whose block inputs
    therefore come from the fp embedding), before the end-to-end phase, which tunes their scales too while the
    teacher's logits still come from the fp head."""
    if littlebit_layers(model):
        raise ValueError("the model already holds LittleBit layers; quantize the full-precision model instead")
    default_skips = HfQuantizer.get_modules_to_not_convert(
        model, None, getattr(model, "_keep_in_fp32_modules", None)
    )
    config.modules_to_not_convert = resolve_modules_to_not_convert(model, config, default_skips)
    # Fused MoE experts become one nn.Linear per expert (views, no copy): planned and converted like any Linear.
    split_model_experts_(model, config.modules_to_not_convert)
    plans = plan_conversion(model, config, config.modules_to_not_convert, pre_quantized=False)
    warn_unconverted(model, plans, config.modules_to_not_convert)
    late: list[LayerPlan] = []  # whole model: the embedding and the LM head, converted after everything else
    if config.whole_model:
        plans, config.tied_heads = whole_model_plans(model, config, plans)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        late = [p for p in plans if p.kind in ("embedding", GROUP_EMBEDDING) or model.get_submodule(p.name) is head]
        plans = [p for p in plans if p not in late]
    elif config.allocation == "auto":
        plans = allocate_plans(model, plans, config)
    record_plans(config, [*plans, *late])

    if calibration is None:
        note_data_free(config)
        bar = logging.tqdm(total=len(plans), desc="LittleBit quantizing", unit="layer", disable=not progress)
        for plan in plans:
            dense = model.get_submodule(plan.name)
            layer = new_littlebit_layer(plan, config, dense, device=dense.weight.device)
            quantize_layer_(layer, dense.weight, config, plan.name)
            model.set_submodule(plan.name, layer)
            bar.update(1)
        bar.close()
        convert_late_(model, late, config)
        return None

    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        tokenizer = _default_tokenizer(model)
    context = _context_length(model)
    seqlen = min(config.calibration_seqlen, context) if context else config.calibration_seqlen
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tokens = calibration_tokens(
        calibration, tokenizer, config.calibration_samples, seqlen, seed=config.seed,
        vocab_size=getattr(embeddings, "num_embeddings", None),
    )
    opts = ReconstructionOptions.from_config(config)
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    try:
        result = BlockReconstructor(model, config, plans, tokens, opts, work_dir=work_dir, resume=resume,
                                    progress=progress, late_plans=late).run()
    finally:
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, False))
    config.calibrated_with = {
        "source": describe_source(calibration), "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
        "steps_per_block": opts.steps, "end_to_end_steps": opts.e2e_steps,
    }
    return result
