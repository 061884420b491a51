"""Sign functions with a usable gradient (METHODS.md §1.3).

The forward of every estimator is the packed format's ``sgn`` (``sgn(0) = +1``); they differ only in the backward:

* ``"smoothsign"`` — the derivative of ``tanh(α x)``: ``α (1 − tanh²(α x))``. LittleBit's QAT choice, α = 100
  on the balanced-split latents (whose entries are ~0.01–0.03 on real layers, inside the sensitive band).
* ``"ste"`` — the clipped identity ``1[|x| < clip]`` (``clip=inf`` gives the plain straight-through estimator).

Plain autograd functions: they know nothing of layers or training loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ESTIMATORS = ("smoothsign", "ste")


def _hard_sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


class SmoothSign(torch.autograd.Function):
    """``sgn`` forward, ``d tanh(α x) / dx`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return _hard_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        t = torch.tanh(ctx.alpha * x)
        return grad * ctx.alpha * (1 - t * t), None


class ClippedSTE(torch.autograd.Function):
    """``sgn`` forward, identity backward inside ``|x| < clip`` and zero outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _hard_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        if math.isinf(ctx.clip):
            return grad, None
        return grad * (x.abs() < ctx.clip).to(grad.dtype), None


def sign_estimator(name: str, alpha: float = 100.0, clip: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sign function named ``name`` with its constant bound (``alpha`` for SmoothSign, ``clip`` for STE)."""
    if name == "smoothsign":
        return lambda x: SmoothSign.apply(x, alpha)
    if name == "ste":
        return lambda x: ClippedSTE.apply(x, clip)
    raise ValueError(f"unknown sign estimator {name!r}; choose one of {list(ESTIMATORS)}")
