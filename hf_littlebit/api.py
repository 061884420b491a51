"""``hf_littlebit.quantize``: convert an already loaded full-precision model in place (in the spirit of torchao's
``quantize_``), data-free or with calibrated block-wise reconstruction.

The result is indistinguishable from ``from_pretrained(..., quantization_config=config)``: same layers, same
``model.config.quantization_config``, a ``model.hf_quantizer``, so ``save_pretrained`` writes the packed format and a
plain ``from_pretrained(folder)`` reloads it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import _assign_is_quantized
from transformers.utils import logging

from .calibration import DEFAULT_SOURCE, calibration_tokens, describe_source
from .config import LittleBitConfig
from .integration import (
    allocate_plans,
    littlebit_layers,
    new_littlebit_layer,
    note_data_free,
    plan_conversion,
    quantize_layer_,
    resolve_modules_to_not_convert,
)
from .modes import make_trainable
from .quantizer import MODEL_TAGS, LittleBitHfQuantizer
from .reconstruct import BlockReconstructor, ReconstructionOptions, ReconstructionResult

logger = logging.get_logger(__name__)


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
    HF quantizer's calibrated path. Returns the reconstruction report when calibrating."""
    if littlebit_layers(model):
        raise ValueError("the model already holds LittleBit layers; quantize the full-precision model instead")
    default_skips = LittleBitHfQuantizer.get_modules_to_not_convert(
        model, None, getattr(model, "_keep_in_fp32_modules", None)
    )
    config.modules_to_not_convert = resolve_modules_to_not_convert(model, config, default_skips)
    plans = plan_conversion(model, config, config.modules_to_not_convert, pre_quantized=False)
    if config.allocation == "auto":
        plans = allocate_plans(model, plans, config)
    config.layer_ranks = {p.name: p.rank for p in plans}

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
                                    progress=progress).run()
    finally:
        model.train(was_training)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, False))
    config.calibrated_with = {
        "source": describe_source(calibration), "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
        "steps_per_block": opts.steps, "end_to_end_steps": opts.e2e_steps,
    }
    return result


def attach_quantizer(model: nn.Module, config: LittleBitConfig) -> LittleBitHfQuantizer:
    """Mark ``model`` as littlebit-quantized exactly as ``from_pretrained`` does (for save/reload/PEFT)."""
    quantizer = LittleBitHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "config"):
        model.config.quantization_config = config
        _assign_is_quantized(model)
    for layer in littlebit_layers(model).values():
        if not layer.is_trainable:
            layer.requires_grad_(False)
    if config.trainable:
        make_trainable(model, config.sign_estimator, config.smoothsign_alpha)
    quantizer.bind(model)
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(MODEL_TAGS)
    return quantizer


def quantize(
    model: nn.Module,
    config: LittleBitConfig,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Quantize a loaded full-precision model in place and return it.

    Args:
        model: a Transformers model in full precision (any device; the work runs where its weights are).
        config: the :class:`LittleBitConfig`; it is updated with the chosen ranks and written to ``model.config``.
        calibration: overrides ``config.calibration``. ``None`` (and ``config.calibration`` unset) quantizes
            data-free; ``"default"`` uses the project's training split; strings, a ``datasets.Dataset`` or token ids
            are accepted (:mod:`hf_littlebit.calibration`).
        tokenizer: needed to tokenise text (default: the tokenizer saved in the model's local folder).
        work_dir: folder for the per-block checkpoints of a calibrated run; with ``resume=True`` an interrupted run
            continues after its last finished block.
        progress: show progress bars (they also follow transformers' global progress-bar switch).
    """
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"the model is already quantized ({model.hf_quantizer.quantization_config.quant_method}); load the "
            "full-precision checkpoint to quantize it with LittleBit"
        )
    if not isinstance(config, LittleBitConfig):
        raise TypeError(f"config must be a LittleBitConfig, got {type(config).__name__}")
    source = calibration if calibration is not None else config.calibration
    if isinstance(source, str) and source == DEFAULT_SOURCE:
        config.calibration = DEFAULT_SOURCE
    result = convert_model_(model, config, source, tokenizer, work_dir=work_dir, resume=resume, progress=progress)
    attach_quantizer(model, config).reconstruction = result
    return model
