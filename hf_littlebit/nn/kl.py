"""Per-token KL divergence between next-token distributions, computed in row chunks with a hand-written backward.

Autograd's ``KL(softmax(t) ‖ softmax(s))`` keeps several logits-sized fp32 intermediates alive (two log-softmaxes,
their difference, the teacher's probabilities) and walks them again in the backward. At a 49k vocabulary and a
thousand tokens each one is 200 MB; on a CPU, allocating and page-faulting those costs more than the arithmetic
(2.1 s against 0.6 s here for forward + backward, SmolLM2's vocabulary, 1,024 tokens, 2 cores). :func:`token_kl` goes
through the rows a few MB at a time and saves one tensor for the backward: the gradient itself,
``(softmax(s/T) − softmax(t/T)) / T``, written once (and not at all when no gradient is needed).

Used by the end-to-end calibration phase and by the distillation loss of QAT; knows nothing of either.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # rows per chunk = this // vocabulary: 16 MB of fp32 per intermediate


class _TokenKL(torch.autograd.Function):
    """KL(teacher ‖ student) per row of ``(N, V)`` logits; gradient to the student only."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float,  # noqa: D102
                chunk_elements: int, needs_grad: bool) -> torch.Tensor:
        rows = max(1, chunk_elements // student.shape[-1])
        kl = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        # ctx.needs_input_grad stays True under torch.no_grad(); the caller knows better.
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device) if needs_grad else None
        for i in range(0, student.shape[0], rows):
            log_s = torch.log_softmax(student[i:i + rows].float() / temperature, dim=-1)
            log_t = torch.log_softmax(teacher[i:i + rows].float() / temperature, dim=-1)
            p_t = log_t.exp()
            kl[i:i + rows] = (p_t * (log_t - log_s)).sum(-1)
            if grad is not None:
                torch.sub(log_s.exp_(), p_t, out=grad[i:i + rows]).div_(temperature)
        ctx.student_dtype = student.dtype
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        # Out of place: the saved gradient must survive a second backward (retain_graph=True).
        return (grad * grad_kl.float()[:, None]).to(ctx.student_dtype), None, None, None, None


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``KL(softmax(teacher/T) ‖ softmax(student/T))`` for every position: shape ``student_logits.shape[:-1]``, fp32.

    Differentiable in ``student_logits`` only; the teacher's logits must not require a gradient (detach them).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both must be (..., vocabulary)")
    if teacher_logits.requires_grad:
        raise ValueError("token_kl: no gradient flows to the teacher; pass teacher_logits.detach()")
    if not temperature > 0:
        raise ValueError(f"token_kl: temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    kl = _TokenKL.apply(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab).to(student_logits.device),
                        float(temperature), int(chunk_elements),
                        torch.is_grad_enabled() and student_logits.requires_grad)
    return kl.reshape(student_logits.shape[:-1])
