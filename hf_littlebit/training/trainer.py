"""``LittleBitTrainer``: ``Trainer`` with the QAT callback and distillation wired in."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from .callback import LittleBitQATCallback
from .distillation import DistillationConfig


class LittleBitTrainer(Trainer):
    """``Trainer`` with LittleBit QAT wired in: the callback, and distillation when given a ``teacher``.

    ``LittleBitTrainer(model, args, train_dataset=..., teacher=fp_model)`` is the whole setup; every other
    argument is ``Trainer``'s. Pass ``qat_callback=LittleBitQATCallback(...)`` to change the schedule.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None,
                 distillation: DistillationConfig | None = None,
                 qat_callback: LittleBitQATCallback | None = None, **kwargs: Any) -> None:
        callback = qat_callback or LittleBitQATCallback(teacher=teacher, distillation=distillation)
        if qat_callback is not None and teacher is not None:
            callback.teacher = teacher
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        kwargs.setdefault("compute_loss_func", callback.loss)
        super().__init__(*args, **kwargs)
        self.qat_callback = callback

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Merge the QAT metrics before the reporters (TensorBoard, W&B...) see the logs.
        if "loss" in logs:
            logs.update(self.qat_callback.collect_metrics())
        super().log(logs, *args, **kwargs)
