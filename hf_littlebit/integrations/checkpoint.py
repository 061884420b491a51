"""Checks of a saved littlebit checkpoint against its own config, from the safetensors headers alone: before any
weight is read, so a mismatch is never zero-filled or re-initialised by the loader."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from ..errors import LittleBitCheckpointError
from ..nn.group_embedding import GroupQuantEmbedding
from ..nn.layer import littlebit_layers

try:  # the loader's own renaming of checkpoint keys (e.g. Mixtral's block_sparse_moe → mlp)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
except ImportError:  # pragma: no cover - older transformers: keys are compared as written
    get_model_conversion_mapping = None

_SAFETENSORS_DTYPES = {
    torch.int32: "I32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
}


def check_checkpoint_tensors(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Refuse a checkpoint whose packed tensors are missing or shaped differently from what its config implies.

    Reads only the safetensors headers, before any weight is loaded, so a mismatch is never zero-filled or
    re-initialised by the loader.
    """
    if not checkpoint_files:
        return
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise LittleBitCheckpointError(f"littlebit checkpoints are read from safetensors only, got {path}")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                header[key] = (tuple(sl.get_shape()), sl.get_dtype())
    header = _as_loaded(model, header)
    problems = []
    stored = {**littlebit_layers(model),
              **{n: m for n, m in model.named_modules() if isinstance(m, GroupQuantEmbedding)}}
    for name, module in stored.items():
        for tensor, (shape, dtype) in module.expected_tensors().items():
            key = f"{name}.{tensor}"
            if key not in header:
                problems.append(f"{key}: missing")
            elif header[key] != (shape, _SAFETENSORS_DTYPES[dtype]):
                problems.append(f"{key}: found {header[key][1]}{list(header[key][0])}, expected "
                                f"{_SAFETENSORS_DTYPES[dtype]}{list(shape)}")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise LittleBitCheckpointError(
            f"littlebit checkpoint does not match its quantization_config ({len(problems)} problem(s)):\n  {shown}\n"
            "The packed tensors and the recorded ranks disagree; the folder is corrupt or was edited. "
            "Re-save it from the model, or re-quantize the full-precision checkpoint."
        )


def _as_loaded(model: nn.Module, header: dict[str, tuple]) -> dict[str, tuple]:
    """Header keys renamed as the loader renames them: ``save_pretrained`` writes an architecture's original names
    (Mixtral's ``block_sparse_moe``), the model's modules carry the new ones. Both names are kept."""
    if get_model_conversion_mapping is None:
        return header
    try:
        mapping = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001 - a model without a mapping: compare as written
        return header
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    if not renamings and not converters:
        return header
    meta = model.state_dict()
    out = dict(header)
    for key, value in header.items():
        renamed, _ = rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), meta)
        out.setdefault(renamed, value)
    return out
