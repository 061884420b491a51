"""Idempotent registration of ``"littlebit"`` with Transformers' quantizer tables.

``register_quantizer`` raises on a second registration, which a re-import or ``importlib.reload`` triggers, so the
tables are written directly: our own class (matched by module and qualified name, which survive a reload) is
replaced silently; anything else already registered under the name is a real conflict and is reported.
"""

from __future__ import annotations

from transformers.quantizers import auto as _auto

from .config import QUANT_METHOD, LittleBitConfig
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


def is_registered() -> bool:
    return _same_class(_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD, object), LittleBitHfQuantizer)
