"""PEFT LoRA on packed LittleBit layers (HF_API.md §f).

PEFT only wraps layer types it knows; others go through ``LoraConfig._register_custom_module``, whose mapping is
per config object and is not written to ``adapter_config.json``. :func:`register_lora` therefore hooks
``LoraConfig.__post_init__`` once, so that *every* ``LoraConfig`` — the user's, and the one PEFT rebuilds from
``adapter_config.json`` in ``PeftModel.from_pretrained`` — maps ``LittleBitLinear`` to :class:`LittleBitLoraLinear`.
It runs on ``import hf_littlebit`` when peft is installed; the mapping only ever matches ``LittleBitLinear``.
For a ``LoraConfig`` created before the import, call ``hf_littlebit.add_lora_mapping(config)``.

Merging is refused: LoRA's dense update cannot be folded into binary factors without re-quantizing.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn

from ..nn.layer import LittleBitLinear

try:
    from peft.tuners.lora import LoraConfig, LoraLayer
except ImportError:  # pragma: no cover - peft is a dependency, but keep the core importable without it
    LoraConfig = LoraLayer = None

_PATCH_FLAG = "_littlebit_registered"


if LoraLayer is not None:

    class LittleBitLoraLinear(nn.Module, LoraLayer):
        """``base(x) + Σ_adapters B(A(dropout(x))) · scaling`` on top of a frozen ``LittleBitLinear``."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any) -> None:
            if getattr(config, "lora_bias", False):
                raise ValueError("LittleBitLoraLinear does not support lora_bias; set LoraConfig(lora_bias=False)")
            if getattr(config, "use_dora", False):
                raise ValueError("LittleBitLoraLinear does not support DoRA; set LoraConfig(use_dora=False)")
            super().__init__()
            with warnings.catch_warnings():
                # PEFT warns "Unsupported layer type ... at your own risk" for any layer it does not know, then reads
                # in_features/out_features, which LittleBitLinear has: the warning is noise for this mapped type.
                warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
                LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype | None]:
            layer = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            dtype = layer.bias.dtype if getattr(layer, "bias", None) is not None else None
            return layer.h.device, dtype

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise NotImplementedError(
                "LoRA adapters cannot be merged into LittleBit's binary factors (it would need re-quantization); "
                "keep the adapters separate, or merge into the fp model and quantize again"
            )

        def unmerge(self) -> None:
            raise NotImplementedError("LittleBit LoRA layers are never merged")

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise NotImplementedError("mixed-adapter batches are not supported on LittleBit layers")
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_a.weight.dtype)
                delta = lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + delta.to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

else:  # pragma: no cover
    LittleBitLoraLinear = None


def add_lora_mapping(config: Any) -> Any:
    """Map ``LittleBitLinear`` → :class:`LittleBitLoraLinear` on one ``LoraConfig`` (idempotent); returns it."""
    if LittleBitLoraLinear is None:
        raise ImportError("peft is not installed: pip install peft")
    config._register_custom_module({LittleBitLinear: LittleBitLoraLinear})
    return config


def register_lora() -> bool:
    """Make every new ``LoraConfig`` know ``LittleBitLinear`` (idempotent). Returns False when peft is missing."""
    if LoraConfig is None:
        return False
    original = LoraConfig.__post_init__
    if getattr(original, _PATCH_FLAG, False):
        return True

    @functools.wraps(original)
    def post_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        add_lora_mapping(self)

    setattr(post_init, _PATCH_FLAG, True)
    LoraConfig.__post_init__ = post_init
    return True
