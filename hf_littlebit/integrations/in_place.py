"""``hf_littlebit.quantize``: convert an already loaded full-precision model in place (in the spirit of torchao's
``quantize_``), data-free or with calibrated block-wise reconstruction.

The result is indistinguishable from ``from_pretrained(..., quantization_config=config)``: same layers, same
``model.config.quantization_config``, a ``model.hf_quantizer``, so ``save_pretrained`` writes the packed format and a
plain ``from_pretrained(folder)`` reloads it. The conversion itself is :mod:`hf_littlebit.quantize.convert`; this
module adds what makes the model a Transformers-quantized one.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.quantizers.base import _assign_is_quantized

from ..config import LittleBitConfig
from ..quantize.calibration import DEFAULT_SOURCE
from ..quantize.convert import convert_model_
from .quantizer import LittleBitHfQuantizer


def attach_quantizer(model: nn.Module, config: LittleBitConfig) -> LittleBitHfQuantizer:
    """Mark ``model`` as littlebit-quantized exactly as ``from_pretrained`` does (for save/reload/PEFT)."""
    quantizer = LittleBitHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if hasattr(model, "config"):
        model.config.quantization_config = config
        _assign_is_quantized(model)
    quantizer.finish(model)
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
            are accepted (:mod:`hf_littlebit.quantize.calibration`).
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
