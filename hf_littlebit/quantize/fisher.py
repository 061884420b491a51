"""Output-gradient second moments of the full-precision model: a diagonal empirical Fisher, made robust.

For every watched ``nn.Linear`` and every transformer block, the mean over calibration tokens of ``(∂L/∂y_c)²`` per
output channel ``c``, where ``L`` is the model's mean next-token cross-entropy on the calibration sequences (true
labels). One forward and backward pass per batch over the fp model; no parameter gradient is kept (the gradient
flows from the embedding output, which alone requires it), only running sums per channel.

Made robust the way NanoQuant describes it: within each batch, tokens whose gradient norm exceeds the
``clip_quantile`` quantile of that batch's token norms are scaled down to it (a few tokens — the first one of a
sequence with massive activations, say — would otherwise own the statistic), and the result is shrunk toward its
mean, ``h ← (1 − γ) h + γ mean(h)``, so that no channel gets a weight near zero.

Used by block reconstruction with ``calibration_fisher=True``: the Linear statistics precondition each factorisation
on its output side (``D_out = √h``, next to the input second moments on its input side), the block statistics weight
the channels of the block-output loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ..errors import ReconstructionError


@dataclass
class CurvatureStats:
    """Shrunk mean squared output gradient per channel: per Linear (by name) and per transformer block."""

    linear_out: dict[str, torch.Tensor] = field(default_factory=dict)
    block_out: list[torch.Tensor] = field(default_factory=list)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor dict (for a safetensors file)."""
        out = {f"linear.{name}": t for name, t in self.linear_out.items()}
        out.update({f"block.{i}": t for i, t in enumerate(self.block_out)})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CurvatureStats:
        blocks = sorted((int(k.split(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("block."))
        return cls({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("linear.")},
                   [v for _, v in blocks])


class _Accumulator:
    """Clipped sums of squared output gradients per channel, for one module."""

    def __init__(self, clip_quantile: float) -> None:
        self.clip_quantile = clip_quantile
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, grad: torch.Tensor) -> None:
        g = grad.detach().float().reshape(-1, grad.shape[-1])
        norms = g.norm(dim=1)
        limit = torch.quantile(norms, self.clip_quantile) if g.shape[0] > 1 else norms.max()
        g = g * (limit / norms.clamp_min(1e-30)).clamp(max=1.0)[:, None]
        sq = g.pow(2).sum(0)
        self.sum = sq if self.sum is None else self.sum + sq
        self.tokens += g.shape[0]

    def result(self, shrinkage: float) -> torch.Tensor:
        h = self.sum / max(self.tokens, 1)
        return ((1 - shrinkage) * h + shrinkage * h.mean()).cpu()


def _output(out: object) -> torch.Tensor | None:
    tensor = out[0] if isinstance(out, tuple | list) else out
    return tensor if isinstance(tensor, torch.Tensor) and tensor.requires_grad else None


@contextmanager
def _watch(modules: dict[str, nn.Module], clip_quantile: float) -> Iterator[dict[str, _Accumulator]]:
    """Forward hooks that hang a gradient hook on each module's output."""
    acc = {name: _Accumulator(clip_quantile) for name in modules}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            tensor = _output(out)
            if tensor is not None:
                tensor.register_hook(acc[name].add)
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]
    try:
        yield acc
    finally:
        for handle in handles:
            handle.remove()


def gradient_second_moments(
    model: nn.Module, blocks: nn.ModuleList, linears: dict[str, nn.Module], tokens: torch.Tensor, batch_size: int,
    clip_quantile: float = 0.999, shrinkage: float = 0.4, progress: bool = True,
) -> CurvatureStats:
    """:class:`CurvatureStats` of the (full-precision) ``model`` on ``tokens`` (samples × seqlen), ``batch_size``
    sequences per forward/backward pass. The model is left as it was (no parameter gradient is created)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ReconstructionError(f"{type(model).__name__} has no input embeddings; Fisher statistics need them")
    device = next(p.device for p in model.parameters() if not p.is_meta)
    watched = {f"linear.{k}": v for k, v in linears.items()} | {f"block.{i}": b for i, b in enumerate(blocks)}
    bar = logging.tqdm(total=tokens.shape[0], desc="LittleBit Fisher statistics", unit="seq", disable=not progress)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # gradients of activations only: no parameter gradient is ever allocated
    try:
        with _watch(watched, clip_quantile) as acc, torch.enable_grad():
            for start in range(0, tokens.shape[0], batch_size):
                ids = tokens[start:start + batch_size].to(device)
                embeds = embeddings(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=embeds, labels=ids, use_cache=False)
                out.loss.backward()
                bar.update(ids.shape[0])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        bar.close()
    missing = [name for name, a in acc.items() if a.sum is None]
    if missing:
        raise ReconstructionError(f"no gradient reached {missing[0]} in the Fisher pass; it is not on the loss path")
    return CurvatureStats({k.removeprefix("linear."): a.result(shrinkage) for k, a in acc.items()
                           if k.startswith("linear.")},
                          [acc[f"block.{i}"].result(shrinkage) for i in range(len(blocks))])
