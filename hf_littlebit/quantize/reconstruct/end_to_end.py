"""The end-to-end phase after the block-wise pass: every layer's scale vectors tuned jointly on KL(fp ‖ quantized) of
the next-token distributions, the teacher computed from the fp model's last-block activations carried by the pass.

A block fit sees only its own output error; this phase sees what the errors of all blocks do together to the
prediction. The ±1 factors stay fixed by default (``calibration_e2e_latents`` tunes them too; at the recipes' rates
almost none flips, see BENCHMARKS.md); so do the codes of a group-quantized embedding, whose per-group scales and
zeros are tuned like the layers' scale vectors.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ...nn.group_embedding import GroupQuantEmbedding
from ...nn.kl import token_kl
from ...nn.layer import LittleBitLinear
from .optim import adam_optimizer, cosine_lr_, minibatch_indices, norm_params, relative_lr_groups
from .options import EndToEndReport, ReconstructionOptions
from .store import ActivationStore

logger = logging.get_logger(__name__)


def next_token_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    return token_kl(logits, teacher_logits).mean()


class _AppendTeacher:
    """Forward hook on the last block: appends the fp model's output of that block along the batch axis.

    The model's head (final norm, ``lm_head``, soft-capping... whatever follows the blocks) then computes the
    teacher's logits in the same pass as the student's, without an fp copy of the model: only the fp hidden states
    after the last block are kept. A packed ``lm_head`` (``whole_model``) is wrapped for the phase by
    :class:`_TeacherHead`, so the teacher's rows still meet the fp head.
    """

    def __init__(self) -> None:
        self.teacher: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.teacher is None:
            return None
        hidden = output[0] if isinstance(output, tuple | list) else output
        both = torch.cat([hidden, self.teacher.to(device=hidden.device, dtype=hidden.dtype)], dim=0)
        return (both, *output[1:]) if isinstance(output, tuple | list) else both


class _TeacherHead(nn.Module):
    """The LM head during the phase when the model's own head is packed (``whole_model``): the packed head for the
    student's rows, the fp head's weight for the teacher's rows that :class:`_AppendTeacher` appended, so the
    teacher's distribution is the fp model's."""

    def __init__(self, head: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, hook: _AppendTeacher
                 ) -> None:
        super().__init__()
        self.head = head
        self.__dict__["fp"] = (weight, bias)  # not parameters: never trained, never saved
        self.__dict__["hook"] = hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.hook.teacher.shape[0] if self.hook.teacher is not None else 0
        if n == 0:
            return self.head(x)
        student = self.head(x[:-n])
        weight, bias = self.fp
        teacher = nn.functional.linear(x[-n:].to(weight.dtype), weight, bias)
        return torch.cat([student, teacher.to(student.dtype)], dim=0)


def _student_and_teacher_logits(model: nn.Module, hook: _AppendTeacher, ids: torch.Tensor, teacher: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    hook.teacher = teacher
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        hook.teacher = None
    return logits[: ids.shape[0]], logits[ids.shape[0]:].detach()


def tune_end_to_end(
    model: nn.Module, last_block: nn.Module, layers: list[LittleBitLinear], tokens: torch.Tensor,
    teacher_hidden: ActivationStore, opts: ReconstructionOptions, seed: int, progress: bool = True,
    eval_batches: int = 4, teacher_head: tuple[str, torch.Tensor, torch.Tensor | None] | None = None,
    embeddings: tuple[GroupQuantEmbedding, ...] = (),
) -> EndToEndReport:
    """Tune the scales of ``layers`` (packed on entry and on return) so the model's next-token distribution on
    ``tokens`` matches the teacher's, given the fp model's outputs of ``last_block`` for each batch of
    ``len(tokens) // len(teacher_hidden)`` sequences. Adam with per-tensor relative learning rates, cosine schedule;
    the ±1 factors stay fixed unless ``opts.e2e_latents`` (then the latents are tuned at the block fits' ``opts.lr``).

    ``teacher_head`` (name, fp weight, fp bias): the model's head is packed (``whole_model``); the teacher's rows go
    through this fp head instead, while the packed head (and embedding, when among ``layers``) are tuned.
    ``embeddings``: group-quantized embeddings whose scales and zeros are tuned too (codes fixed)."""
    t0 = time.perf_counter()
    device = next(p.device for p in model.parameters() if not p.is_meta)
    batch = tokens.shape[0] // len(teacher_hidden)
    batches = [tokens[i * batch:(i + 1) * batch].to(device) for i in range(len(teacher_hidden))]
    hook = _AppendTeacher()
    handle = last_block.register_forward_hook(hook)
    norms = norm_params(model) if opts.tune_norms else []
    packed_head = None
    if teacher_head is not None:
        head_name, weight, bias = teacher_head
        packed_head = model.get_submodule(head_name)
        model.set_submodule(head_name, _TeacherHead(packed_head, weight, bias, hook))
    try:
        for layer in layers:
            layer.make_trainable_(estimator=opts.estimator, alpha=opts.alpha)
            for prefix in layer.path_prefixes:
                for name in ("u_latent", "v_latent"):
                    getattr(layer, prefix + name).requires_grad_(opts.e2e_latents)
        for embedding in embeddings:
            embedding.tune_scales_()
        for p in norms:
            p.requires_grad_(True)

        @torch.no_grad()
        def measure() -> float:
            n = min(eval_batches, len(batches))
            return sum(next_token_kl(*_student_and_teacher_logits(model, hook, batches[i], teacher_hidden[i])).item()
                       for i in range(n)) / max(n, 1)

        before = measure()
        optimizer = adam_optimizer(relative_lr_groups([*layers, *embeddings], norms, opts, scale_lr=opts.e2e_lr))
        bar = logging.tqdm(total=opts.e2e_steps, desc="LittleBit end-to-end", unit="step", disable=not progress)
        with torch.enable_grad():
            for step, i in enumerate(minibatch_indices(len(batches), opts.e2e_steps, seed)):
                cosine_lr_(optimizer, step, opts.e2e_steps)
                loss = next_token_kl(*_student_and_teacher_logits(model, hook, batches[i], teacher_hidden[i]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix_str(f"KL {loss.item():.4g}")
                bar.update(1)
        bar.close()
        after = measure()
    finally:
        handle.remove()
        if packed_head is not None:
            model.set_submodule(teacher_head[0], packed_head)
        for p in norms:
            p.requires_grad_(False)
        for layer in layers:
            layer.pack_()
        for embedding in embeddings:
            embedding.freeze_scales_()
    report = EndToEndReport(opts.e2e_steps, before, after, time.perf_counter() - t0)
    logger.info(f"LittleBit end-to-end: KL {before:.4g} -> {after:.4g} ({report.seconds:.1f} s)")
    return report
