"""Finding a model's transformer blocks and capturing what the first one receives.

Block-wise reconstruction runs block by block on stored activations, so it needs the list of blocks, the inputs of
block 0 for every calibration batch, and the keyword arguments (masks, rotary tables...) each block is called with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ReconstructionError
from ...nn.layer import LittleBitLinear
from .store import ActivationStore


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks: the ``ModuleList`` with ``num_hidden_layers`` entries."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and any(isinstance(x, nn.Linear | LittleBitLinear)
                                                                for x in m[0].modules())
    ]
    if n_layers is not None:
        exact = [c for c in candidates if len(c[1]) == n_layers]
        if exact:
            return exact[0]
    if not candidates:
        raise ReconstructionError(
            f"{type(model).__name__} has no list of transformer blocks; block-wise reconstruction needs a decoder "
            "with a ModuleList of layers (quantize without calibration instead)"
        )
    return max(candidates, key=lambda c: len(c[1]))


def block_output(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, spill_dir: Path | None
) -> tuple[ActivationStore, list[dict[str, Any]]]:
    """Inputs of block 0 for every batch, and the keyword arguments (masks, rotary tables...) each block receives.

    Batch 0 runs the whole model once so that every block's arguments are seen (they differ between blocks in
    hybrid-attention models); the other batches stop at block 0. All batches have the same shape, so the arguments
    recorded on batch 0 are valid for every batch.
    """
    device = next(p.device for p in model.parameters() if not p.is_meta)
    store = ActivationStore(spill_dir)
    kwargs_per_block: list[dict[str, Any] | None] = [None] * len(blocks)
    state = {"full": True}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kw = dict(kwargs)
            hidden = kw.pop("hidden_states", None)
            if hidden is None:
                hidden = args[0]
            kw["past_key_values"] = None
            kw["use_cache"] = False
            if kwargs_per_block[index] is None:
                kwargs_per_block[index] = kw
            if index == 0:
                store.append(hidden)
                if not state["full"]:
                    raise _StopForward
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            state["full"] = start == 0
            try:
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in kwargs_per_block):
        raise ReconstructionError("some transformer blocks were not called in a forward pass; cannot calibrate them")
    return store, kwargs_per_block  # type: ignore[return-value]
