"""``LittleBitHfQuantizer``: the Transformers 5.x hooks (see HF_API.md §2.3–2.4 for when each one runs).

* From a full-precision checkpoint (``pre_quantized=False``): every convertible ``nn.Linear`` is swapped for an empty
  ``LittleBitLinear`` that still exposes a meta ``weight`` placeholder; each dense weight is routed to
  :class:`LittleBitQuantizeOp` as it arrives, factorised on its device and packed in place, so two full copies of
  the model never coexist.
* From a saved littlebit checkpoint (``pre_quantized=True``): layers are sized from the recorded ranks, the
  safetensors headers are checked against them, and the packed tensors load by name.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..config import DENSE_SAVE_DTYPES, FORMAT_VERSION, LittleBitConfig
from ..errors import LittleBitCheckpointError, LittleBitQuantizationError, LittleBitTrainingError
from ..nn.embedding import LittleBitEmbedding, LittleBitTiedHead
from ..nn.experts import FUSED_TO_LIST, LittleBitExperts, merge_experts_
from ..nn.group_embedding import GroupQuantEmbedding
from ..nn.layer import LittleBitLinear, littlebit_layers
from ..nn.modes import install_model_methods, is_trainable, make_trainable, packed_state_dict
from ..quantize.convert import convert_model_
from ..quantize.experts import quantize_fused_, recorded_expert_modules, split_model_experts_
from ..quantize.layers import note_data_free, quantize_layer_, replace_linears
from ..quantize.plan import plan_conversion, resolve_modules_to_not_convert, warn_unconverted
from ..quantize.whole_model import attach_tied_heads, retie
from .checkpoint import check_checkpoint_tensors
from .dense_dtype import cast_dense_remainder

logger = logging.get_logger(__name__)

MODEL_TAGS = ["littlebit", "quantized", "binary-factorization"]


class LittleBitQuantizeOp(ConversionOps):
    """Quantize-on-load: receives one dense ``weight`` and packs it into its ``LittleBitLinear``."""

    def __init__(self, quantizer: LittleBitHfQuantizer) -> None:
        self.hf_quantizer = quantizer

    @torch.no_grad()
    def convert(
        self,
        input_dict: dict[str, Any],
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        key, values = next(iter(input_dict.items()))
        weight = values[0] if isinstance(values, list) else values
        full_layer_name = full_layer_name or key
        module, tensor_name = get_module_from_name(model, full_layer_name)
        if isinstance(module, LittleBitExperts):
            return self._convert_fused(module, tensor_name, weight, full_layer_name, missing_keys)
        layer_name = full_layer_name.removesuffix(".weight")
        try:
            quantize_layer_(module, weight, self.hf_quantizer.quantization_config, layer_name)
        except ValueError as exc:
            # Transformers would bury this under a generic "issues during automatic conversion" error; keep it and
            # raise it, naming the layer, once loading is over.
            self.hf_quantizer.layer_errors[layer_name] = str(exc)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
            for tensor in module.expected_tensors():
                missing_keys.discard(f"{layer_name}.{tensor}")
        module._is_hf_initialized = True
        self.hf_quantizer.advance_progress()
        return {}

    def _convert_fused(self, module: LittleBitExperts, tensor_name: str, weight: torch.Tensor, full_name: str,
                       missing_keys: set[str] | None) -> dict[str, torch.Tensor]:
        """One fused expert tensor of the checkpoint (merged by Transformers' conversion mapping): every expert's
        matrix packed into its own layer, the fused placeholder dropped."""
        module_name = full_name.removesuffix("." + tensor_name)
        names = quantize_fused_(module, tensor_name, weight, self.hf_quantizer.quantization_config, module_name,
                                self.hf_quantizer.layer_errors)
        if missing_keys is not None:
            missing_keys.discard(full_name)
            for name, layer in zip(names, getattr(module, FUSED_TO_LIST[tensor_name]), strict=True):
                for tensor in layer.expected_tensors():
                    missing_keys.discard(f"{name}.{tensor}")
        for _ in names:
            self.hf_quantizer.advance_progress()
        return {}


class LittleBitHfQuantizer(HfQuantizer):
    """Transformers quantizer for ``quant_method="littlebit"``."""

    requires_calibration = False
    quantization_config: LittleBitConfig

    def __init__(self, quantization_config: LittleBitConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._progress = None
        self._n_layers = 0
        self.layer_errors: dict[str, str] = {}
        self.reconstruction = None  # report of a calibrated load
        self._model_ref: weakref.ref | None = None  # the model this quantizer belongs to (for the training flags)

    # -------------------------------------------------------------- environment
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if self.pre_quantized and getattr(cfg, "format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise LittleBitCheckpointError(
                f"this checkpoint uses littlebit format {cfg.format_version}, newer than this release understands "
                f"({FORMAT_VERSION}); upgrade hf-littlebit"
            )

    @property
    def quantized_element_size(self) -> float:
        # The fp placeholder disappears on quantization; the packed tensors are declared with their real sizes.
        return 0.0

    # -------------------------------------------------------------- module swap
    @property
    def converts_after_load(self) -> bool:
        """Quantize the whole loaded fp model at once instead of layer by layer during loading: block-wise
        calibration needs the model, the global allocator needs every layer's spectrum before any rank is set, and
        ``whole_model`` needs the loaded (tied) embedding and head."""
        cfg = self.quantization_config
        return not self.pre_quantized and (cfg.calibration is not None or cfg.allocation == "auto" or cfg.whole_model)

    def _process_model_before_weight_loading(
        self, model: torch.nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        cfg = self.quantization_config
        if self.converts_after_load:
            return  # the fp model loads as is; _process_model_after_weight_loading converts it
        default_skips = self.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
        if not self.pre_quantized:
            note_data_free(cfg)  # quantize-on-load never has calibration data
            cfg.modules_to_not_convert = resolve_modules_to_not_convert(model, cfg, default_skips)
        # Fused MoE experts: one layer per expert, like any Linear; on load the fused tensors still arrive whole.
        only = recorded_expert_modules(cfg.layer_ranks or {}) if self.pre_quantized else None
        split_model_experts_(model, cfg.modules_to_not_convert or [], keep_fused=not self.pre_quantized, only=only)
        plans = plan_conversion(model, cfg, cfg.modules_to_not_convert or [], self.pre_quantized)
        if not self.pre_quantized:
            cfg.layer_ranks = {p.name: p.rank for p in plans}
            warn_unconverted(model, plans, cfg.modules_to_not_convert)
        replace_linears(model, plans, cfg, with_fp_weight=not self.pre_quantized)
        attach_tied_heads(model, cfg)  # whole_model: the tied LM head over the packed embedding, ties dropped
        if self.pre_quantized:
            check_checkpoint_tensors(model, checkpoint_files)
        self._n_layers = len(plans)

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized or self.converts_after_load:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, LittleBitExperts):
            return tensor_name in FUSED_TO_LIST
        return isinstance(module, LittleBitLinear) and tensor_name == "weight"

    def get_quantize_ops(self) -> LittleBitQuantizeOp:
        return LittleBitQuantizeOp(self)

    def advance_progress(self) -> None:
        """One more layer packed; the bar follows transformers' progress-bar switch."""
        if self._progress is None:
            self._progress = logging.tqdm(total=self._n_layers, desc="LittleBit quantizing", unit="layer")
        self._progress.update(1)

    # -------------------------------------------------------------- after load
    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        if self.converts_after_load:
            self.reconstruction = convert_model_(model, self.quantization_config, self.quantization_config.calibration)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.layer_errors:
            first = next(iter(self.layer_errors.values()))
            raise LittleBitQuantizationError(
                f"LittleBit could not quantize {len(self.layer_errors)} layer(s): {first}"
                + (f" (and {len(self.layer_errors) - 1} more: {list(self.layer_errors)[1:4]})"
                   if len(self.layer_errors) > 1 else "")
            )
        unfilled = [name for name, layer in littlebit_layers(model).items()
                    if not (layer.is_packed or layer.is_trainable)]
        if unfilled:
            raise LittleBitCheckpointError(
                f"{len(unfilled)} LittleBit layer(s) received no weights, e.g. {unfilled[0]}; the checkpoint lacks "
                "their dense weight (quantize on load) or packed tensors (reload)"
            )
        self.finish(model)
        return model

    def finish(self, model: torch.nn.Module) -> None:
        """The last step of every way in (load, reload, in-place ``quantize``): packed layers frozen (the loader wraps
        loaded floats as trainable Parameters), trainable mode if asked for, the model remembered (weakly) with its
        ``littlebit_pack()`` / ``littlebit_make_trainable()`` methods, and the model tags."""
        for layer in littlebit_layers(model).values():
            if not layer.is_trainable:
                layer.requires_grad_(False)
        for module in model.modules():
            if isinstance(module, GroupQuantEmbedding):  # frozen; trainable mode (below) tunes its scales
                module.requires_grad_(False)
        cfg = self.quantization_config
        if cfg.trainable:
            make_trainable(model, cfg.sign_estimator, cfg.smoothsign_alpha)
        self._model_ref = weakref.ref(model)
        install_model_methods(model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(MODEL_TAGS)

    # -------------------------------------------------------------- save / flags
    def get_state_dict_and_metadata(
        self, model: torch.nn.Module
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """Refuse to save anything that would not reload, before a single file is written.

        A model in trainable mode is saved in the packed format (signs of the latents, scales in storage dtype)
        without leaving trainable mode, so checkpoints written during training are ordinary littlebit folders. With
        ``dense_save_dtype`` the tensors outside the packed layers are written in that dtype.
        """
        cfg = self.quantization_config
        layers = littlebit_layers(model)
        for name, layer in layers.items():
            if not (layer.is_packed or layer.is_trainable):
                raise ValueError(f"cannot save: LittleBit layer {name} holds no packed factors")
            if cfg.layer_ranks.get(name) != layer.rank:
                raise ValueError(
                    f"cannot save: layer {name} has rank {layer.rank} but the config records "
                    f"{cfg.layer_ranks.get(name)}; the model was modified after quantization"
                )
        missing = set(cfg.layer_ranks) - set(layers)
        if missing:
            raise ValueError(f"cannot save: config lists LittleBit layers that the model lacks, e.g. {min(missing)}")
        group = getattr(cfg, "group_embedding", None)
        if group is not None and not isinstance(dict(model.named_modules()).get(group), GroupQuantEmbedding):
            raise ValueError(f"cannot save: config records {group} as a group-quantized embedding, but the model's "
                             "module there is not one; the model was modified after quantization")
        state_dict = packed_state_dict(model) if is_trainable(model) else None
        if cfg.dense_save_dtype is not None:
            state = state_dict if state_dict is not None else model.state_dict()
            state_dict = cast_dense_remainder(model, state, DENSE_SAVE_DTYPES[cfg.dense_save_dtype])
        return state_dict, {"littlebit_format": str(FORMAT_VERSION), "littlebit_method": cfg.method}

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters (PEFT) train on top of the frozen packed layers; QAT trains the layers themselves.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """True when the model's layers are in trainable mode (QAT without adapters).

        ``Trainer`` reads this (only) to decide whether a quantized model without adapters may train. A packed model
        with neither trainable layers nor adapters gets our error, which names both ways out, instead of the generic
        one.
        """
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            return bool(self.quantization_config.trainable)
        if is_trainable(model):
            return True
        if _has_adapters(model):
            return False
        raise LittleBitTrainingError(
            "this LittleBit model is packed (inference format) and has nothing to train. For quantization-aware "
            "training call hf_littlebit.make_trainable(model) (or load with LittleBitConfig(..., trainable=True)); "
            "to fine-tune adapters instead, wrap it with peft.get_peft_model(model, LoraConfig(...))"
        )

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """``model.dequantize()``: replace every packed layer by a dense ``nn.Linear`` holding ``Ŵ`` (a packed or
        group-quantized embedding by an ``nn.Embedding``, a head tied to it by an ``nn.Linear`` sharing its weight,
        tie restored), and every split experts module by its architecture's fused experts module holding the
        experts' ``Ŵ``."""
        tied = {name: m for name, m in model.named_modules() if isinstance(m, LittleBitTiedHead)}
        dense_embeddings = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, GroupQuantEmbedding):
                dense_embeddings[id(module)] = module.dense_module(dtype)
                model.set_submodule(name, dense_embeddings[id(module)])
        for name, layer in littlebit_layers(model).items():
            if isinstance(layer, LittleBitEmbedding):
                dense_embeddings[id(layer)] = layer.dense_module(dtype)
                model.set_submodule(name, dense_embeddings[id(layer)])
                continue
            device = layer.h.device
            out_dtype = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    device=device, dtype=out_dtype)
            with torch.no_grad():
                dense.weight.copy_(layer.dequantize_weight(torch.float32))
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            model.set_submodule(name, dense)
        for module in list(model.modules()):  # split experts: fused Ŵ tensors and the architecture's own class
            if isinstance(module, LittleBitExperts):
                merge_experts_(module, lambda layer: layer.weight.detach())
        for name, head in tied.items():
            emb = dense_embeddings[id(head.embedding)]
            linear = torch.nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
            linear.weight = emb.weight
            model.set_submodule(name, linear)
        if tied:
            retie(model)
        return model


def _has_adapters(model: torch.nn.Module) -> bool:
    """PEFT adapters attached to ``model`` (through peft or transformers' ``add_adapter``)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())
