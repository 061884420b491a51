"""Per-input-channel second moments of ``nn.Linear`` inputs, collected with forward hooks.

Activation-aware factorisation (``LittleBitConfig(activation_aware=True)``, DBF's importance weighting) needs, for
every layer, ``E[x_j²]`` over the calibration tokens for each input channel ``j``. The hooks keep one running sum
per layer (d_in floats), never the activations themselves, so the cost is independent of the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class InputSecondMoments:
    """Context manager: while active, accumulates ``Σ x_j²`` and the token count of each named layer's input.

    >>> with InputSecondMoments({"fc": model.fc}) as stats:
    ...     model(batch)
    >>> stats.mean()["fc"]  # (d_in,) tensor, float32
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputSecondMoments:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            sq = x.pow(2).sum(0)
            self.sums[name] = self.sums[name] + sq if name in self.sums else sq
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        return hook

    def mean(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``E[x_j²]`` per layer that saw at least one token."""
        keys = self.sums.keys() if names is None else [n for n in names if n in self.sums]
        return {k: self.sums[k] / max(self.counts[k], 1) for k in keys}
