"""Calibrated block-wise reconstruction: quantize one transformer block at a time and fit it to its fp outputs.

For block ``i`` (in order):

1. its inputs ``X`` are the outputs of blocks ``0..i-1`` *as already quantized* (error propagation), for every
   calibration sequence; the targets are the full-precision *model's* activations after this block
   (``targets="fp_inputs"``, default: the block also learns to undo the error of the blocks before it), or the
   full-precision block's outputs on the same ``X`` (``targets="quantized_inputs"``);
2. each convertible ``nn.Linear`` of the block is factorised with the configured method and replaced by a
   :class:`~hf_littlebit.nn.layer.LittleBitLinear` in trainable mode (latent factors, signs through a straight-through
   estimator, fp32 scales). With error-propagation mitigation (``mitigation_steps``) the layers go one at a time,
   in the block's order: before each factorisation the block's still-dense weights are tuned on the block loss
   (:func:`~.block_fit.mitigate_block`), so the layer is factorised from a weight that already absorbs the error of
   the quantized prefix and of the block's layers factorised before it;
3. latents, scales (and optionally the block's norms) are optimised with Adam to minimise the block-output error
   (per-token normalised MSE by default), on minibatches of the calibration set;
4. the layers are packed (the fp weights are gone from the model), the block's outputs on ``X`` become the next
   block's inputs, and — with a work folder — the packed block and those inputs are written to disk so an interrupted
   run resumes at the next block.

Optionally (``e2e_steps``) an end-to-end phase follows: with the fp model's outputs of the last block kept from the
pass above, the scale vectors of every layer are tuned jointly on KL(fp ‖ quantized) of the next-token distributions
(:func:`tune_end_to_end`). A block fit sees only its own output error; this phase sees what the errors of all blocks
do together to the prediction.

Only one block's inputs and targets are held at once (in memory, or spilled to disk above a size limit). This module
drives modules and tensors; it knows the config's numbers, not the Transformers loading machinery.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from ...config import LittleBitConfig
from ...errors import ReconstructionError
from ...nn.experts import EXPERT_LAYER
from ...nn.group_embedding import GroupQuantEmbedding
from ...nn.layer import LittleBitLinear
from ..activation_stats import InputSecondMoments
from ..fisher import CurvatureStats, gradient_second_moments
from ..layers import factorize_for_layer, new_littlebit_layer
from ..plan import LayerPlan
from ..whole_model import convert_late_
from .block_fit import evaluate_block, mitigate_block, optimise_block
from .capture import block_output, capture_block_inputs, find_blocks
from .end_to_end import tune_end_to_end
from .options import BlockReport, ReconstructionOptions, ReconstructionResult
from .state import WorkFolder, fingerprint
from .store import ActivationStore

logger = logging.get_logger(__name__)


def first_expert_projection(name: str) -> bool:
    """An expert's first layer (``gate_up`` / ``up``): its input count is the number of tokens routed to it."""
    match = EXPERT_LAYER.match(name)
    return match is not None and match["list"] != "down_layers"


@dataclass
class MitigationData:
    """What a mitigation phase fits on: the block's stored inputs, its targets, call arguments and channel weights."""

    inputs: ActivationStore
    targets: ActivationStore
    kwargs: dict
    weight: torch.Tensor | None


class BlockReconstructor:
    """Runs the procedure of the module docstring over ``blocks`` of ``model``, with optional resume."""

    def __init__(
        self,
        model: nn.Module,
        config: LittleBitConfig,
        plans: list[LayerPlan],
        tokens: torch.Tensor,
        opts: ReconstructionOptions,
        work_dir: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        late_plans: list[LayerPlan] | None = None,
    ) -> None:
        self.model = model
        self.late_plans = list(late_plans or [])  # whole_model: embedding and LM head, converted after the blocks
        self.config = config
        self.plans = {p.name: p for p in plans}
        self.tokens = tokens
        self.opts = opts
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.resume = resume
        self.progress = progress
        self.blocks_name, self.blocks = find_blocks(model)
        self.device = next(p.device for p in model.parameters() if not p.is_meta)
        self._tmp_root: Path | None = None
        self.batch_size = max(d for d in range(1, min(opts.batch_size, tokens.shape[0]) + 1)
                              if tokens.shape[0] % d == 0)

    # ------------------------------------------------------------------ helpers
    def block_plans(self, index: int) -> list[LayerPlan]:
        prefix = f"{self.blocks_name}.{index}."
        return [p for name, p in self.plans.items() if name.startswith(prefix)]

    def outside_plans(self) -> list[LayerPlan]:
        prefix = f"{self.blocks_name}."
        return [p for name, p in self.plans.items() if not name.startswith(prefix)]

    def _spill_dir(self, name: str) -> Path | None:
        t = self.tokens
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", 0) or 0
        gib = t.numel() * hidden * 4 / 2**30
        if gib <= self.opts.max_activation_gib:
            return None
        if self.work_dir is not None:
            return self.work_dir / "spill" / name
        if self._tmp_root is None:
            self._tmp_root = Path(tempfile.mkdtemp(prefix="littlebit-activations-"))
        return self._tmp_root / name

    def _convert_block(self, index: int, trainable: bool,
                       importance: dict[str, torch.Tensor] | None = None,
                       mitigate: MitigationData | None = None) -> list[LittleBitLinear]:
        """Replace the block's planned Linears by LittleBit layers, in order; trainable ones are factorised from the
        dense weight, each after a mitigation phase when ``mitigate`` carries the block's data."""
        plans = self.block_plans(index)
        layers = []
        for j, plan in enumerate(plans):
            dense = self.model.get_submodule(plan.name)
            if trainable and mitigate is not None:
                rest = [self.model.get_submodule(p.name) for p in plans[j:]]
                # the layers factorised before this one are not tuned here: no gradient is computed for them
                flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
                for p, _ in flags:
                    p.requires_grad_(False)
                try:
                    mitigate_block(self.blocks[index], rest, mitigate.inputs, mitigate.targets, mitigate.kwargs,
                                   self.opts, seed=(self.config.seed * 1_000_003 + index) * 64 + j,
                                   device=self.device, weight=mitigate.weight)
                finally:
                    for p, flag in flags:
                        p.requires_grad_(flag)
            layer = new_littlebit_layer(plan, self.config, dense, device=self.device)
            if trainable:
                paths = factorize_for_layer(dense.weight, plan, self.config,
                                            input_importance=(importance or {}).get(plan.name),
                                            output_importance=self._output_importance(plan.name))
                layer.make_trainable_(paths, estimator=self.opts.estimator, alpha=self.opts.alpha)
            layers.append(layer)
            self.model.set_submodule(plan.name, layer)
        return layers

    # ------------------------------------------------------------------ resume
    def _restore_finished_blocks(self) -> int:
        """Rebuild the blocks a resumed run already finished (packed, from the work folder); returns how many."""
        done, reports = self.work.finished_blocks()
        for index in range(done):
            layers = self._convert_block(index, trainable=False)
            self.blocks[index].load_state_dict(self.work.block_tensors(index), strict=True, assign=False)
            for layer in layers:
                layer.requires_grad_(False)
        self.result.blocks = [BlockReport(**b) for b in reports]
        return done

    def _curvature(self) -> CurvatureStats:
        """The fp model's Fisher statistics: measured before the first block is touched and kept in the work folder,
        so a resumed run (whose first blocks are already quantized) uses the very same ones."""
        saved = self.work.load_curvature()
        if saved is not None:
            return CurvatureStats.from_tensors(saved)
        if any(isinstance(m, LittleBitLinear) for m in self.model.modules()):
            raise ReconstructionError("the work folder lacks the Fisher statistics of this run; start it again "
                                      "with an empty work folder")
        linears = {name: self.model.get_submodule(name) for name in self.plans}
        stats = gradient_second_moments(self.model, self.blocks, linears, self.tokens, self.batch_size,
                                        shrinkage=self.opts.fisher_shrinkage, progress=self.progress)
        self.work.save_curvature(stats.to_tensors())
        return stats

    def _output_importance(self, name: str) -> torch.Tensor | None:
        return self.curvature.linear_out.get(name) if self.curvature is not None else None

    # ------------------------------------------------------------------ main loop
    def run(self) -> ReconstructionResult:
        self.result = ReconstructionResult()
        self.work = WorkFolder(self.work_dir, self.resume,
                               fingerprint(self.model, self.config, self.tokens, self.opts))
        start = self._restore_finished_blocks()
        self.result.resumed_from = start
        self.curvature = self._curvature() if self.opts.fisher else None
        # On resume only one batch is run, for the blocks' arguments; the inputs come from the work folder.
        capture = self.tokens if start == 0 else self.tokens[: self.batch_size]
        inputs, kwargs = capture_block_inputs(
            self.model, self.blocks, capture, self.batch_size, self._spill_dir("inputs_0")
        )
        if start > 0:
            inputs.clear()
            inputs = ActivationStore.load(self.work.inputs_dir, self._spill_dir(f"inputs_{start}"))
        fp_inputs = None
        if self.opts.tracks_fp:
            fp_inputs = (ActivationStore.load(self.work.fp_inputs_dir, self._spill_dir(f"fp_inputs_{start}"))
                         if start > 0 else inputs.copy(self._spill_dir("fp_inputs_0")))
        bar = logging.tqdm(total=len(self.blocks), initial=start, desc="LittleBit calibrating", unit="block",
                           disable=not self.progress)
        try:
            for index in range(start, len(self.blocks)):
                inputs, fp_inputs = self._run_block(index, inputs, fp_inputs, kwargs[index], bar)
            bar.close()
            self._convert_outside_blocks()
            end_to_end = self.opts.e2e_steps > 0 and fp_inputs is not None
            teacher_head = self._convert_late(keep_fp_head=end_to_end)
            if end_to_end:
                modules = [*map(self.model.get_submodule, [*self.plans, *(p.name for p in self.late_plans)])]
                self.result.end_to_end = tune_end_to_end(
                    self.model, self.blocks[-1], [m for m in modules if isinstance(m, LittleBitLinear)], self.tokens,
                    fp_inputs, self.opts, seed=self.config.seed * 1_000_003 + len(self.blocks),
                    progress=self.progress, teacher_head=teacher_head,
                    embeddings=tuple(m for m in modules if isinstance(m, GroupQuantEmbedding)),
                )
        finally:
            bar.close()
            inputs.clear()
            if fp_inputs is not None:
                fp_inputs.clear()
            if self._tmp_root is not None:
                shutil.rmtree(self._tmp_root, ignore_errors=True)
        return self.result

    def _convert_outside_blocks(self) -> None:
        """Layers outside the blocks (e.g. OPT's project_in/out) have no block to be calibrated in: data-free."""
        for plan in self.outside_plans():
            dense = self.model.get_submodule(plan.name)
            layer = new_littlebit_layer(plan, self.config, dense, device=dense.weight.device)
            layer.set_factors_(factorize_for_layer(dense.weight, plan, self.config,
                                                   output_importance=self._output_importance(plan.name)))
            self.model.set_submodule(plan.name, layer)
            self.result.outside_blocks.append(plan.name)

    def _convert_late(self, keep_fp_head: bool) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
        """``whole_model``: pack the embedding and the LM head (data-free) now that every block is fitted (their
        scales are tuned by the end-to-end phase). Returns the fp head's name, weight and bias when
        ``keep_fp_head``, so the end-to-end teacher's logits keep coming from the fp head."""
        if not self.late_plans:
            return None
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        teacher = None
        if keep_fp_head and isinstance(getattr(head, "weight", None), torch.Tensor):
            name = next(n for n, m in self.model.named_modules() if m is head)
            bias = getattr(head, "bias", None)
            teacher = (name, head.weight.detach(), bias.detach() if bias is not None else None)
        convert_late_(self.model, self.late_plans, self.config)
        self.result.outside_blocks.extend(p.name for p in self.late_plans)
        return teacher

    def _run_block(
        self, index: int, inputs: ActivationStore, fp_inputs: ActivationStore | None, kwargs: dict, bar,
    ) -> tuple[ActivationStore, ActivationStore | None]:
        t0 = time.perf_counter()
        block = self.blocks[index]
        targets = ActivationStore(self._spill_dir(f"targets_{index}"))
        # The fp block's pass that makes the targets also measures its layers' input statistics (activation-aware),
        # and counts the tokens the router sends to each expert (MoE).
        experts = [p.name for p in self.block_plans(index) if first_expert_projection(p.name)]
        watched = {p.name: self.model.get_submodule(p.name) for p in self.block_plans(index)
                   if self.config.activation_aware or p.name in experts}
        fp_targets = self.opts.targets == "fp_inputs"
        with torch.no_grad(), InputSecondMoments(watched) as stats:
            for x in (fp_inputs if fp_targets else inputs):
                targets.append(block_output(block, x.to(self.device), kwargs))
        fp_next = None  # the fp model's outputs of this block, when they are not the targets already
        if fp_inputs is not None and not fp_targets:
            fp_next = ActivationStore(self._spill_dir(f"fp_inputs_{index + 1}"))
            with torch.no_grad():
                for x in fp_inputs:
                    fp_next.append(block_output(block, x.to(self.device), kwargs))
        weight = self.curvature.block_out[index] if self.curvature is not None else None  # Fisher-weighted loss
        mitigate = MitigationData(inputs, targets, kwargs, weight) if self.opts.mitigation_steps > 0 else None
        layers = self._convert_block(index, trainable=True, importance=stats.mean(), mitigate=mitigate)
        before, delta_before = evaluate_block(block, inputs, targets, kwargs, self.opts.loss, self.device,
                                              weight=weight)
        if layers and self.opts.steps > 0:
            optimise_block(block, layers, inputs, targets, kwargs, self.opts,
                           seed=self.config.seed * 1_000_003 + index, device=self.device, weight=weight)
        for layer in layers:
            layer.pack_()
        next_inputs = ActivationStore(self._spill_dir(f"inputs_{index + 1}"))
        after, delta_after = evaluate_block(block, inputs, targets, kwargs, self.opts.loss, self.device, next_inputs,
                                            weight=weight)
        inputs.clear()
        if fp_inputs is not None:  # the fp block's outputs are the fp model's inputs of the next block
            fp_inputs.clear()
            fp_inputs = fp_next if fp_next is not None else targets.copy(self._spill_dir(f"fp_inputs_{index + 1}"))
        targets.clear()
        report = BlockReport(index, len(layers), before, after, time.perf_counter() - t0, delta_before, delta_after,
                             expert_tokens={name: stats.counts.get(name, 0) for name in experts})
        self.result.blocks.append(report)
        self.work.save_block(index, self.blocks[index].state_dict(), next_inputs, fp_inputs, self.result.blocks)
        bar.set_postfix_str(f"block {index}: loss {before:.4g} → {after:.4g}")
        bar.update(1)
        logger.info(f"LittleBit block {index}: {len(layers)} layers, loss {before:.4g} -> {after:.4g} "
                    f"({report.seconds:.1f} s)")
        if report.experts_without_tokens:
            logger.warning(f"LittleBit block {index}: {report.experts_without_tokens} of {len(experts)} experts "
                           "received no calibration token and keep their data-free initialisation")
        return next_inputs, fp_inputs
