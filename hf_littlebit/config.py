"""``LittleBitConfig``: what the user asks for, and what a saved model needs to rebuild its shapes."""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .budget import is_valid_bpw

QUANT_METHOD = "littlebit"
FORMAT_VERSION = 1

# Methods whose factoriser exists; the others are reserved names that a later release fills in.
AVAILABLE_METHODS = ("littlebit", "littlebit2")
PLANNED_METHODS = ("dbf",)

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# The paper's `kv_factor` acts on modules whose name ends in k_proj / v_proj.
KV_PATTERN = r"\.(k_proj|v_proj)$"


def _is_int(value: object) -> bool:
    """A real integer (``bool`` is an ``int`` subclass but not a valid count or seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


class LittleBitConfig(QuantizationConfigMixin):
    """Configuration of the LittleBit quantizer (``quant_method="littlebit"``).

    Args:
        bpw: target bits per weight of every converted ``nn.Linear`` (0 < bpw ≤ 16). The rank of each layer follows
            from it by the paper's rule; the true stored bits are reported by :func:`hf_littlebit.summary`.
        method: how the binary factors are found: ``"littlebit"`` (Dual-SVID) or ``"littlebit2"`` (Internal Latent
            Rotation with Joint-ITQ, then Dual-SVID; same stored format). ``"dbf"`` is reserved.
        residual: add a second binary path fitted to the first path's error (the budget is split between both).
        modules_to_not_convert: module names or patterns kept in full precision. ``None`` keeps the LM head and tied
            weights; the resolved list is written back on load so a saved model does not depend on heuristics.
            Embeddings and norms are never converted (they are not ``nn.Linear``).
        bpw_multipliers: ``{regex: factor}`` multiplying the float rank of matching module names before rounding.
        kv_factor: the paper's K/V knob, shorthand for ``bpw_multipliers={r"\\.(k_proj|v_proj)$": kv_factor}``.
        min_rank: floor of the rank (layers too small for the target get this rank and a warning).
        seed: seed of every random choice (per layer it is mixed with the layer name).
        itq_iterations: Joint-ITQ iterations of ``"littlebit2"`` (default 50; most of the gain comes in the first 10).
        scale_dtype: storage dtype of the scale vectors h, l, g: ``"float16"`` (default), ``"bfloat16"``,
            ``"float32"``.
        layer_ranks: filled by the quantizer: the rank of every converted layer, so a saved model rebuilds its
            shapes on load without re-deriving them.
    """

    def __init__(
        self,
        bpw: float = 1.0,
        method: str = "littlebit",
        residual: bool = True,
        modules_to_not_convert: list[str] | None = None,
        bpw_multipliers: dict[str, float] | None = None,
        kv_factor: float = 1.0,
        min_rank: int = 8,
        seed: int = 0,
        itq_iterations: int = 50,
        scale_dtype: str = "float16",
        layer_ranks: dict[str, int] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.bpw = bpw
        self.method = method
        self.residual = residual
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.bpw_multipliers = dict(bpw_multipliers or {})
        self.kv_factor = kv_factor
        self.min_rank = min_rank
        self.seed = seed
        self.itq_iterations = itq_iterations
        self.scale_dtype = str(scale_dtype).removeprefix("torch.")
        self.layer_ranks = dict(layer_ranks or {})
        self.format_version = format_version
        # Keep unknown keys (written by a newer release) so that a round trip does not drop them.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field and the accepted values."""
        if not is_valid_bpw(self.bpw):
            raise ValueError(f"LittleBitConfig: bpw must be a number with 0 < bpw <= 16, got {self.bpw!r}")
        self.bpw = float(self.bpw)
        if self.method in PLANNED_METHODS:
            raise NotImplementedError(
                f"LittleBitConfig: method {self.method!r} is planned but not available in this release; "
                f"use one of {list(AVAILABLE_METHODS)}"
            )
        if self.method not in AVAILABLE_METHODS:
            raise ValueError(
                f"LittleBitConfig: unknown method {self.method!r}; choose one of {list(AVAILABLE_METHODS)}"
            )
        if not isinstance(self.residual, bool):
            raise ValueError(f"LittleBitConfig: residual must be True or False, got {self.residual!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"LittleBitConfig: scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if not _is_int(self.min_rank) or self.min_rank < 1:
            raise ValueError(f"LittleBitConfig: min_rank must be a positive integer, got {self.min_rank!r}")
        if not _is_int(self.itq_iterations) or self.itq_iterations < 0:
            raise ValueError(
                f"LittleBitConfig: itq_iterations must be a non-negative integer, got {self.itq_iterations!r}"
            )
        if not _is_int(self.seed):
            raise ValueError(f"LittleBitConfig: seed must be an integer, got {self.seed!r}")
        for pattern, factor in {**self.bpw_multipliers, "kv_factor": self.kv_factor}.items():
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
                raise ValueError(
                    f"LittleBitConfig: multiplier for {pattern!r} must be a positive number, got {factor!r}"
                )
        for pattern in self.bpw_multipliers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"LittleBitConfig: bpw_multipliers pattern {pattern!r} is not a valid regex: {exc}"
                ) from exc
        for name, rank in self.layer_ranks.items():
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"LittleBitConfig: layer_ranks[{name!r}] must be a positive integer, got {rank!r}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def factorizer_options(self) -> dict:
        """Method-specific keyword arguments for the factoriser."""
        return {"n_iter": self.itq_iterations} if self.method == "littlebit2" else {}

    def rank_factor(self, module_name: str) -> float:
        """Product of every multiplier whose pattern matches ``module_name`` (``re.search``)."""
        factor = 1.0
        if self.kv_factor != 1.0 and re.search(KV_PATTERN, module_name):
            factor *= self.kv_factor
        for pattern, mult in self.bpw_multipliers.items():
            if re.search(pattern, module_name):
                factor *= mult
        return factor
