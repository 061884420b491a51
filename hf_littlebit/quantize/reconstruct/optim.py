"""Optimiser plumbing shared by the block fits and the end-to-end phase: Adam groups with learning rates relative to
each tensor's RMS, a cosine schedule, and a seeded minibatch order (so a run is deterministic and resumable)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .options import ReconstructionOptions


def relative_lr_groups(layers: list[nn.Module], norms: list[nn.Parameter], opts: ReconstructionOptions,
                       scale_lr: float | None = None) -> list[dict]:
    """Adam groups of the trainable tensors of ``layers`` (LittleBit layers; group-quantized embeddings with tuned
    scales), with learning rates proportional to each tensor's RMS (steps are relative): latents at ``opts.lr``,
    everything else at ``scale_lr`` (default ``opts.scale_lr``)."""
    scale_lr = opts.scale_lr if scale_lr is None else scale_lr
    groups = []
    for layer in layers:
        for name, p in layer.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            base = opts.lr if name.endswith("_latent") else scale_lr
            rms = p.detach().pow(2).mean().sqrt().item()
            groups.append({"params": [p], "lr": base * (rms if rms > 0 else 1.0)})
    if norms:
        groups.append({"params": norms, "lr": opts.norm_lr})
    return groups


def norm_params(block: nn.Module) -> list[nn.Parameter]:
    """Weights of the block's normalisation layers (any module whose class name contains "Norm")."""
    return [p for m in block.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]


def cosine_lr_(optimizer: torch.optim.Optimizer, step: int, steps: int) -> None:
    factor = 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def minibatch_indices(n: int, steps: int, seed: int) -> Iterator[int]:
    """``steps`` batch indices in ``range(n)``: seeded shuffles, one pass over the batches after another."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(n, generator=generator).tolist()
        yield order.pop()


def adam_optimizer(groups: list[dict]) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer
