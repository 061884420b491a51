"""What block-wise reconstruction is asked to do (:class:`ReconstructionOptions`, from the config's
``calibration_*`` fields) and what it reports back (per block, end-to-end phase, whole run)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import LittleBitConfig


@dataclass
class BlockReport:
    """What happened to one block (also written to the work folder)."""

    index: int
    layers: int
    loss_before: float
    loss_after: float
    seconds: float
    delta_error_before: float = float("nan")  # ‖y − t‖² / ‖t − x‖²: error relative to the block's own contribution
    delta_error_after: float = float("nan")
    # MoE: calibration tokens routed to each expert (by its first projection's layer name) in the fp block's pass;
    # experts that got none keep their data-free initialisation (nothing to fit them to).
    expert_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def experts_without_tokens(self) -> int:
        return sum(1 for n in self.expert_tokens.values() if n == 0)


@dataclass
class EndToEndReport:
    """The end-to-end phase: KL(fp ‖ quantized) per token on the first calibration batches, before and after."""

    steps: int
    kl_before: float
    kl_after: float
    seconds: float


@dataclass
class ReconstructionResult:
    blocks: list[BlockReport] = field(default_factory=list)
    resumed_from: int = 0
    outside_blocks: list[str] = field(default_factory=list)
    end_to_end: EndToEndReport | None = None

    @property
    def experts_without_tokens(self) -> int:
        """Experts (all blocks) that no calibration token reached: they keep their data-free initialisation."""
        return sum(b.experts_without_tokens for b in self.blocks)

    def to_dict(self) -> dict:
        return {
            "blocks": [vars(b) for b in self.blocks],
            "experts_without_tokens": self.experts_without_tokens,
            "resumed_from": self.resumed_from,
            "outside_blocks": self.outside_blocks,
            "end_to_end": vars(self.end_to_end) if self.end_to_end is not None else None,
        }


@dataclass
class ReconstructionOptions:
    """The knobs of the procedure (taken from :class:`LittleBitConfig`'s ``calibration_*`` fields)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    scale_lr: float = 1e-3
    tune_norms: bool = False
    norm_lr: float = 1e-4
    loss: str = "token_normalized"
    targets: str = "fp_inputs"
    estimator: str = "ste"
    alpha: float = 100.0
    max_activation_gib: float = 4.0
    e2e_steps: int = 0
    e2e_lr: float = 1e-2
    e2e_latents: bool = False
    fisher: bool = False
    fisher_shrinkage: float = 0.4
    mitigation_steps: int = 0
    mitigation_lr: float = 1e-2

    @property
    def tracks_fp(self) -> bool:
        """Whether the pass carries the fp model's activations along (as targets, or as the end-to-end teacher)."""
        return self.targets == "fp_inputs" or self.e2e_steps > 0

    @classmethod
    def from_config(cls, config: LittleBitConfig) -> ReconstructionOptions:
        return cls(
            steps=config.calibration_steps, batch_size=config.calibration_batch_size, lr=config.calibration_lr,
            scale_lr=config.calibration_scale_lr, tune_norms=config.calibration_tune_norms,
            loss=config.calibration_loss, targets=config.calibration_targets, estimator=config.sign_estimator,
            alpha=config.smoothsign_alpha, max_activation_gib=config.calibration_offload_gib,
            e2e_steps=config.calibration_e2e_steps, e2e_lr=config.calibration_e2e_lr,
            e2e_latents=config.calibration_e2e_latents,
            fisher=config.calibration_fisher, fisher_shrinkage=config.calibration_fisher_shrinkage,
            mitigation_steps=config.calibration_mitigation_steps, mitigation_lr=config.calibration_mitigation_lr,
        )
