"""Idempotent registration of ``"littlebit"`` with Transformers' quantizer tables.

``register_quantizer`` raises on a second registration, which a re-import or ``importlib.reload`` triggers, so the
tables are written directly: our own class (matched by module and qualified name, which survive a reload) is
replaced silently; anything else already registered under the name is a real conflict and is reported.

LittleBitConfig is also added to ``LOADING_ATTRIBUTES_CONFIG_TYPES``, the tuple of configs whose
``get_loading_attributes()`` Transformers merges into a checkpoint's config: that is how
``from_pretrained(packed_dir, quantization_config=LittleBitConfig(trainable=True))`` reaches the quantizer.
"""

from __future__ import annotations

from transformers.quantizers import auto as _auto

from ..config import QUANT_METHOD, LittleBitConfig
from .quantizer import LittleBitHfQuantizer


def _same_class(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register() -> None:
    for table, cls in (
        (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, LittleBitConfig),
        (_auto.AUTO_QUANTIZER_MAPPING, LittleBitHfQuantizer),
    ):
        current = table.get(QUANT_METHOD)
        if current is not None and not _same_class(current, cls):
            raise RuntimeError(
                f"the quantization method name {QUANT_METHOD!r} is already registered by {current.__module__}."
                f"{current.__qualname__}; uninstall the conflicting package or report this to hf-littlebit"
            )
        table[QUANT_METHOD] = cls
    types = getattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple):
        _auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (
            *(t for t in types if not _same_class(t, LittleBitConfig)), LittleBitConfig
        )


def is_registered() -> bool:
    return _same_class(_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD, object), LittleBitHfQuantizer)
