"""Checks of a saved littlebit checkpoint against its own config, from the safetensors headers alone: before any
weight is read, so a mismatch is never zero-filled or re-initialised by the loader."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from ..errors import LittleBitCheckpointError
from ..nn.layer import littlebit_layers

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
    problems = []
    for name, module in littlebit_layers(model).items():
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
