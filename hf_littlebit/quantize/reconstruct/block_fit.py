"""Fitting one transformer block to its targets: the block loss, its evaluation over the stored batches, and the
Adam loop over the block's latent factors and scales (and optionally its norms)."""

from __future__ import annotations

import torch
from torch import nn

from ...nn.layer import LittleBitLinear
from .capture import block_output
from .optim import adam_optimizer, cosine_lr_, minibatch_indices, norm_params, relative_lr_groups
from .options import ReconstructionOptions
from .store import ActivationStore


def block_loss(y: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``"token_normalized"``: mean over tokens of ‖y − t‖² / ‖t‖²; ``"mse"``: mean squared error. ``weight`` (one
    non-negative weight per channel, e.g. the block output's Fisher diagonal) weighs the channels of both:
    ``Σ_c w_c (y − t)_c² / Σ_c w_c t_c²`` per token, or the weighted mean squared error."""
    diff = (y.float() - target.float()).pow(2)
    sq = target.float().pow(2)
    if weight is not None:
        w = weight.to(device=diff.device, dtype=torch.float32)
        w = w / w.mean().clamp_min(1e-30)  # the same loss scale as unweighted
        diff, sq = diff * w, sq * w
    if kind == "mse":
        return diff.mean()
    return (diff.sum(-1) / sq.sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def evaluate_block(
    block: nn.Module, inputs: ActivationStore, targets: ActivationStore, kwargs: dict, kind: str,
    device: torch.device, next_inputs: ActivationStore | None = None, weight: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean loss over all batches, and the error relative to the block's contribution ``‖y − t‖² / ‖t − x‖²``
    (the residual stream dominates ``‖t‖``, so the loss alone flatters a block). With ``next_inputs`` the outputs
    are also stored for the next block."""
    total = err = ref = 0.0
    for x, t in zip(inputs, targets, strict=True):
        x, t = x.to(device), t.to(device)
        y = block_output(block, x, kwargs)
        total += block_loss(y, t, kind, weight).item()
        err += (y.float() - t.float()).pow(2).sum().item()
        ref += (t.float() - x.float()).pow(2).sum().item()
        if next_inputs is not None:
            next_inputs.append(y)
    return total / max(len(inputs), 1), err / max(ref, 1e-30)


def optimise_block(
    block: nn.Module, layers: list[LittleBitLinear], inputs: ActivationStore, targets: ActivationStore,
    kwargs: dict, opts: ReconstructionOptions, seed: int, device: torch.device, weight: torch.Tensor | None = None,
) -> None:
    """Adam on latents and scales (and norms) of one block for ``opts.steps`` minibatch steps, cosine schedule, on
    :func:`block_loss` (channels weighted by ``weight`` when given)."""
    norms = norm_params(block) if opts.tune_norms else []
    fit_block_(block, relative_lr_groups(layers, norms, opts), norms, inputs, targets, kwargs, opts.steps, opts.loss,
               seed, device, weight)


def mitigate_block(
    block: nn.Module, dense: list[nn.Linear], inputs: ActivationStore, targets: ActivationStore, kwargs: dict,
    opts: ReconstructionOptions, seed: int, device: torch.device, weight: torch.Tensor | None = None,
) -> None:
    """Error-propagation mitigation: Adam on the still-dense ``nn.Linear`` weights (and biases) of the block for
    ``opts.mitigation_steps`` steps on :func:`block_loss`, so they absorb the error that the quantized prefix and the
    block's already-factorised layers introduce — the next layer is then factorised from its *mitigated* weight.
    Learning rates are relative to each weight's RMS (``opts.mitigation_lr``)."""
    params = [p for layer in dense for p in layer.parameters(recurse=False)]
    groups = [{"params": [p], "lr": opts.mitigation_lr * (p.detach().pow(2).mean().sqrt().item() or 1.0)}
              for p in params]
    fit_block_(block, groups, params, inputs, targets, kwargs, opts.mitigation_steps, opts.loss, seed, device, weight)


def fit_block_(
    block: nn.Module, groups: list[dict], unfrozen: list[nn.Parameter], inputs: ActivationStore,
    targets: ActivationStore, kwargs: dict, steps: int, loss_kind: str, seed: int, device: torch.device,
    weight: torch.Tensor | None,
) -> None:
    """``steps`` Adam steps (cosine schedule, seeded minibatch order) on the parameters of ``groups``; ``unfrozen``
    are switched to ``requires_grad`` for the fit and back to frozen after it."""
    if steps <= 0 or not groups:
        return
    for p in unfrozen:
        p.requires_grad_(True)
    optimizer = adam_optimizer(groups)
    try:
        with torch.enable_grad():
            for step, i in enumerate(minibatch_indices(len(inputs), steps, seed)):
                cosine_lr_(optimizer, step, steps)
                y = block_output(block, inputs[i].to(device), kwargs)
                loss = block_loss(y, targets[i].to(device), loss_kind, weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in unfrozen:
            p.requires_grad_(False)
