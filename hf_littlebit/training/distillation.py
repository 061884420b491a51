"""The distillation loss of LittleBit's QAT recipe (METHODS.md §2): KL(teacher ‖ student) on the logits plus a
weighted per-layer hidden-state term, normalised the way ``Trainer`` expects under gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LittleBitTrainingError
from ..nn.kl import token_kl

KD_REDUCTIONS = ("batchmean", "token_mean")
HIDDEN_LOSSES = ("mse", "token_normalized")


@dataclass
class DistillationConfig:
    """Weights of the distillation loss. Defaults reproduce LittleBit's recipe (METHODS.md §2).

    Attributes:
        kd_weight: weight of the logit KL(teacher ‖ student).
        kd_reduction: ``"batchmean"`` (the paper: KL summed over the tokens of a sequence, averaged over sequences,
            i.e. sequence length × the per-token mean) or ``"token_mean"`` (per-token mean).
        temperature: softmax temperature of both distributions (the KL is multiplied by T²).
        hidden_mse_weight: weight λ of the summed per-layer hidden-state MSE (the paper: 10; 0 disables it and
            skips returning hidden states).
        hidden_loss: ``"mse"`` (the paper: mean squared error over the hidden size) or ``"token_normalized"``
            (‖h_s − h_t‖² / ‖h_t‖² per token: on models with massive activations, e.g. SmolLM2's first token with a
            hidden-state norm ~10⁴, plain MSE is dominated by a few tokens and its gradient swamps the KL).
        lm_loss_weight: weight of the student's own next-token cross-entropy (the paper: 0).
    """

    kd_weight: float = 1.0
    kd_reduction: str = "batchmean"
    temperature: float = 1.0
    hidden_mse_weight: float = 10.0
    hidden_loss: str = "mse"
    lm_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.kd_reduction not in KD_REDUCTIONS:
            raise ValueError(f"kd_reduction must be one of {list(KD_REDUCTIONS)}, got {self.kd_reduction!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {self.hidden_loss!r}")
        for name in ("kd_weight", "hidden_mse_weight", "lm_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Next-token cross-entropy summed over label tokens (``-100`` ignored), divided by ``num_items`` (default:
    the number of label tokens), the normalisation ``Trainer`` expects under gradient accumulation."""
    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    denom = num_items if num_items is not None else (shift_labels != -100).sum().clamp(min=1)
    return total / denom


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_hidden: tuple[torch.Tensor, ...] | None = None,
    teacher_hidden: tuple[torch.Tensor, ...] | None = None,
    attention_mask: torch.Tensor | None = None,
    config: DistillationConfig | None = None,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(teacher ‖ student) on the logits plus λ · Σ_layers MSE of the hidden states.

    Per-token terms are summed over the (unmasked) tokens and divided by ``num_items`` (the Trainer's token count
    over the accumulated batch) or, by default, by this batch's token count; ``kd_reduction="batchmean"``
    multiplies the KL by the sequence length as the paper's ``reduction="batchmean"`` does. Hidden states are
    compared from the first decoder layer's output on (``hidden_states[1:]``), each as a mean over the hidden size
    (``hidden_loss="mse"``) or relative to the teacher's squared norm (``"token_normalized"``).
    Returns the loss and its parts (floats, for logging).
    """
    cfg = config or DistillationConfig()
    mask = attention_mask.to(student_logits.device).float() if attention_mask is not None else \
        torch.ones(student_logits.shape[:2], device=student_logits.device)
    local = mask.sum().clamp(min=1)
    denom = num_items if num_items is not None else local
    seq_factor = student_logits.shape[1] if cfg.kd_reduction == "batchmean" else 1
    t = cfg.temperature
    kl_tok = token_kl(student_logits, teacher_logits.detach(), temperature=t) * (t * t)
    kd_sum = (kl_tok * mask).sum() * seq_factor
    loss = cfg.kd_weight * kd_sum / denom
    # Logged parts are normalised by this batch's own tokens (comparable across accumulation and processes).
    parts = {"kd_loss": (kd_sum / local).item()}
    if cfg.hidden_mse_weight > 0 and student_hidden is not None and teacher_hidden is not None:
        if len(student_hidden) != len(teacher_hidden):
            raise LittleBitTrainingError(
                f"student returned {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}: the teacher "
                "must be the full-precision version of the student"
            )
        hidden_sum = student_logits.new_zeros((), dtype=torch.float32)
        for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
            ht = ht.to(hs.device).float()
            sq = (hs.float() - ht).pow(2)
            per_tok = sq.mean(-1) if cfg.hidden_loss == "mse" else sq.sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-12)
            hidden_sum = hidden_sum + (per_tok * mask).sum()
        loss = loss + cfg.hidden_mse_weight * hidden_sum / denom
        parts["hidden_mse"] = (hidden_sum / local).item()
    return loss, parts
