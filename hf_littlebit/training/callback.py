"""Quantization-aware training with the Hugging Face ``Trainer`` (METHODS.md §2).

* :class:`LittleBitQATCallback` drives QAT around a plain ``Trainer``: it checks the model is trainable, freezes the
  embeddings and LM head (all but a packed one's scales, see :func:`~hf_littlebit.nn.modes.make_trainable`), runs
  the residual schedule (train the main path alone, then enable — and, with a teacher, re-fit — the residual path at
  a given step), logs the sign-flip rate and the residual path's share of the output, and packs the model at the end.
* Distillation is opt-in: hand the callback a frozen full-precision ``teacher`` and use its ``loss`` method as the
  Trainer's ``compute_loss_func``. The callback runs the teacher on exactly the student's batch (a
  forward pre-hook on the student) and the loss is logit KL plus weighted per-layer hidden-state MSE
  (:mod:`hf_littlebit.training.distillation`). :mod:`hf_littlebit.training.trainer`'s ``LittleBitTrainer`` wires both
  for you.

The teacher is never registered as a submodule, so it is never saved, moved by ``Trainer`` or seen by the optimiser.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..errors import LittleBitTrainingError
from ..factorize import FACTORIZERS
from ..format.packing import pack_signs, unpack_signs
from ..nn.layer import littlebit_layers
from ..nn.modes import freeze_embeddings_, is_trainable, pack
from ..quantize.layers import layer_seed
from .distillation import DistillationConfig, causal_lm_loss, distillation_loss

logger = logging.get_logger(__name__)

METRIC_KEYS = ("kd_loss", "hidden_mse", "lm_loss", "sign_flip_rate", "residual_share")


class LittleBitQATCallback(TrainerCallback):
    """Drives LittleBit QAT around ``Trainer`` (see the module docstring).

    Args:
        teacher: the full-precision model (same architecture, same tokenizer); frozen, put in eval mode, moved to
            the training device and cast to the student's dtype. ``None``: plain language-modelling loss.
        distillation: :class:`DistillationConfig` (defaults: the paper's weights).
        residual_start_step: train the main path alone until this optimiser step, then enable the residual path
            (``None`` or 0: both paths from the start). With a teacher the residual path is re-fitted at that step
            to what the main path leaves of the teacher's weight, by the model's factoriser.
        freeze_embeddings: freeze input embeddings and LM head (the paper does); the scales of packed ones
            (``whole_model``) keep the ``requires_grad`` that ``make_trainable`` gave them (trainable by default).
        pack_at_end: pack the model into the inference format when training ends.
        probe_rows: random input rows per layer used to measure the residual path's share of the output.
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        residual_start_step: int | None = None,
        freeze_embeddings: bool = True,
        pack_at_end: bool = True,
        probe_rows: int = 16,
    ) -> None:
        if residual_start_step is not None and residual_start_step < 0:
            raise ValueError(f"residual_start_step must be ≥ 0, got {residual_start_step}")
        self.teacher = teacher
        self.distillation = distillation or DistillationConfig()
        self.residual_start_step = residual_start_step or 0
        self.freeze_embeddings = freeze_embeddings
        self.pack_at_end = pack_at_end
        self.probe_rows = probe_rows
        self.model: nn.Module | None = None
        self._hook = None
        self._teacher_out: Any = None
        self._mask: torch.Tensor | None = None
        self._parts_sum: dict[str, float] = {}
        self._parts_n = 0
        self._sign_snapshot: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        """``compute_loss_func`` for ``Trainer``: distillation when a teacher ran on this batch, else the LM loss."""
        teacher_out, self._teacher_out = self._teacher_out, None
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        lm = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        lm_local = (causal_lm_loss(logits.detach(), labels).item() if num_items_in_batch is not None
                    else lm.item()) if lm is not None else None
        if teacher_out is None:
            if lm is None:
                raise LittleBitTrainingError("no teacher ran on this batch and it has no labels: nothing to train on")
            self._accumulate({"lm_loss": lm_local})
            return lm
        cfg = self.distillation
        loss, parts = distillation_loss(
            logits, teacher_out.logits, getattr(outputs, "hidden_states", None),
            getattr(teacher_out, "hidden_states", None), self._mask, cfg, num_items_in_batch,
        )
        if lm is not None:
            parts["lm_loss"] = lm_local
            if cfg.lm_loss_weight > 0:
                loss = loss + cfg.lm_loss_weight * lm
        self._accumulate(parts)
        return loss

    def _accumulate(self, parts: dict[str, float]) -> None:
        for key, value in parts.items():
            self._parts_sum[key] = self._parts_sum.get(key, 0.0) + value
        self._parts_n += 1

    def _run_teacher(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.teacher is None or not module.training or not torch.is_grad_enabled():
            return None
        want_hidden = self.distillation.hidden_mse_weight > 0
        inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch", "return_dict")}
        inputs.update(use_cache=False, output_hidden_states=want_hidden)
        with torch.no_grad():
            self._teacher_out = self.teacher(*args, **inputs)
        self._mask = kwargs.get("attention_mask")
        if want_hidden:
            kwargs = {**kwargs, "output_hidden_states": True}
        return args, kwargs

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.model = model
        trainable = is_trainable(model)
        if not trainable and not _has_trainable_adapters(model):
            raise LittleBitTrainingError(
                "LittleBitQATCallback: the model's LittleBit layers are packed; call hf_littlebit.make_trainable("
                "model) or load with LittleBitConfig(..., trainable=True) (or train PEFT adapters on top)"
            )
        if trainable and self.freeze_embeddings:
            freeze_embeddings_(_base_model(model))  # a packed embedding's scales stay as make_trainable set them
        if self.teacher is not None:
            self._prepare_teacher(model, args)
            self._hook = model.register_forward_pre_hook(self._run_teacher, with_kwargs=True)
        if trainable and self.residual_start_step > state.global_step:
            for layer in self._trainable_layers().values():
                layer.residual_enabled = False
        self._snapshot_signs()

    def on_step_begin(self, args, state, control, **kwargs: Any) -> None:
        if self.residual_start_step and state.global_step == self.residual_start_step:
            self.enable_residual()

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or any(k in logs for k in METRIC_KEYS):
            return  # not a training log, or LittleBitTrainer.log already merged the metrics
        metrics = self.collect_metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._teacher_out = None
        if self.pack_at_end and self.model is not None and is_trainable(self.model):
            pack(_base_model(self.model))

    # ------------------------------------------------------------------ pieces
    def _prepare_teacher(self, model: nn.Module, args: Any) -> None:
        teacher = self.teacher
        teacher.eval()
        teacher.requires_grad_(False)
        student_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.requires_grad),
                             None)
        teacher_dtype = next(p.dtype for p in teacher.parameters() if p.is_floating_point())
        if student_dtype is not None and teacher_dtype != student_dtype and student_dtype != torch.float32:
            logger.info(f"LittleBit QAT: casting the teacher from {teacher_dtype} to the student's {student_dtype}")
            teacher.to(student_dtype)
        teacher.to(args.device)

    def _trainable_layers(self) -> dict[str, nn.Module]:
        base = _base_model(self.model)
        return {name.removesuffix(".base_layer"): layer for name, layer in littlebit_layers(base).items()
                if layer.is_trainable}

    @torch.no_grad()
    def enable_residual(self) -> None:
        """Switch the residual paths on; with a teacher, re-fit each to what the main path leaves of its weight."""
        refit = 0
        config = getattr(getattr(_base_model(self.model), "hf_quantizer", None), "quantization_config", None)
        for name, layer in self._trainable_layers().items():
            layer.residual_enabled = True
            if not layer.residual or self.teacher is None:
                continue
            dense = _find_linear(self.teacher, name, layer)
            if dense is None:
                continue
            main_w = layer.factor_paths()[0].reconstruct()
            err = dense.weight.detach().float().to(main_w.device) - main_w
            method = getattr(config, "method", "littlebit")
            seed = layer_seed(getattr(config, "seed", 0), name + ".residual")
            opts = config.factorizer_options() if config is not None else {}
            path = FACTORIZERS[method](err, layer.rank, torch.Generator(device=err.device).manual_seed(seed), **opts)
            for key, value in (("u_latent", path.u), ("v_latent", path.v), ("h", path.h), ("l", path.l),
                               ("g", path.g)):
                getattr(layer, "res_" + key).copy_(value)
            refit += 1
        logger.info(f"LittleBit QAT: residual paths enabled ({refit} re-fitted from the teacher)")

    def _snapshot_signs(self) -> None:
        self._sign_snapshot = {
            name: [pack_signs(getattr(layer, p + n).detach()) for p in layer.path_prefixes for n in ("u_latent",
                                                                                               "v_latent")]
            for name, layer in self._trainable_layers().items()
        }

    @torch.no_grad()
    def sign_flip_rate(self) -> float:
        """Share of binary factor entries whose sign changed since the last call (then re-snapshots)."""
        flipped = total = 0
        for name, layer in self._trainable_layers().items():
            before = self._sign_snapshot.get(name)
            tensors = [getattr(layer, p + n).detach() for p in layer.path_prefixes for n in ("u_latent", "v_latent")]
            if before is not None:
                for old, new in zip(before, tensors, strict=True):
                    signs = torch.where(new < 0, -1.0, 1.0)
                    flipped += (unpack_signs(old, new.shape[1]) != signs).sum().item()
                    total += new.numel()
        self._snapshot_signs()
        return flipped / total if total else 0.0

    @torch.no_grad()
    def residual_share(self) -> float:
        """Mean over layers of ‖residual path output‖ / ‖both paths' output‖ on seeded random inputs."""
        shares = []
        generator = torch.Generator().manual_seed(0)
        for layer in self._trainable_layers().values():
            if not layer.residual:
                continue
            if not layer.residual_enabled:
                shares.append(0.0)
                continue
            x = torch.randn(self.probe_rows, layer.in_features, generator=generator).to(layer.h.device)
            main, res = layer.path_outputs(x)
            shares.append((res.norm() / (main + res).norm().clamp(min=1e-12)).item())
        return sum(shares) / len(shares) if shares else 0.0

    def collect_metrics(self) -> dict[str, float]:
        """Loss parts averaged since the last call, sign-flip rate and residual share (QAT only)."""
        metrics = {k: v / max(self._parts_n, 1) for k, v in self._parts_sum.items()}
        self._parts_sum, self._parts_n = {}, 0
        if self.model is not None and is_trainable(self.model):
            metrics["sign_flip_rate"] = self.sign_flip_rate()
            metrics["residual_share"] = self.residual_share()
        return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _base_model(model: nn.Module) -> nn.Module:
    """The Transformers model under a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _has_trainable_adapters(model: nn.Module) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def _find_linear(teacher: nn.Module, name: str, layer: nn.Module) -> nn.Linear | None:
    try:
        dense = teacher.get_submodule(name)
    except AttributeError:
        return None
    weight = getattr(dense, "weight", None)
    if weight is None or tuple(weight.shape) != (layer.out_features, layer.in_features):
        return None
    return dense
