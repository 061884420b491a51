"""The chunked per-token KL against autograd's plain formula: values, gradients, dtypes, misuse."""

import pytest
import torch

from hf_littlebit.nn.kl import token_kl


def _reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_elements", [1, 40, 1 << 22])  # one row, a few rows, everything at once
def test_values_and_gradient_match_autograd(temperature, chunk_elements):
    torch.manual_seed(0)
    student = (torch.randn(3, 7, 13) * 3).requires_grad_(True)
    teacher = torch.randn(3, 7, 13) * 3
    weights = torch.rand(3, 7)  # e.g. an attention mask times a normaliser: a non-uniform upstream gradient
    kl = token_kl(student, teacher, temperature=temperature, chunk_elements=chunk_elements)
    (kl * weights).sum().backward()
    ref_student = student.detach().clone().requires_grad_(True)
    ref = _reference(ref_student, teacher, temperature)
    (ref * weights).sum().backward()
    assert kl.shape == (3, 7) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-4, atol=1e-7)
    assert (kl >= -1e-6).all()


def test_identical_distributions_give_zero_and_second_backward_works():
    logits = torch.randn(4, 9, requires_grad=True)
    kl = token_kl(logits, logits.detach())
    assert kl.abs().max().item() < 1e-6
    shifted = token_kl(logits, logits.detach() + 5.0)  # softmax is shift invariant
    assert shifted.abs().max().item() < 1e-5
    other = token_kl(logits, torch.randn(4, 9)).sum()
    other.backward(retain_graph=True)
    first = logits.grad.clone()
    other.backward()
    torch.testing.assert_close(logits.grad, 2 * first)  # the saved gradient was not consumed in place


def test_half_precision_student_gets_gradient_in_its_dtype():
    torch.manual_seed(0)
    student = torch.randn(5, 11).bfloat16().requires_grad_(True)
    teacher = torch.randn(5, 11).bfloat16()
    token_kl(student, teacher).sum().backward()
    ref_student = student.detach().float().requires_grad_(True)
    _reference(ref_student, teacher.float(), 1.0).sum().backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student.grad.float(), ref_student.grad, rtol=2e-2, atol=1e-3)


def test_no_gradient_buffer_without_grad_and_clear_errors():
    with torch.no_grad():
        kl = token_kl(torch.randn(2, 6, requires_grad=True), torch.randn(2, 6))
    assert kl.grad_fn is None and kl.shape == (2,)
    with pytest.raises(ValueError, match="detach"):
        token_kl(torch.randn(2, 6), torch.randn(2, 6, requires_grad=True))
    with pytest.raises(ValueError, match="differ in shape"):
        token_kl(torch.randn(2, 6), torch.randn(2, 7))
    with pytest.raises(ValueError, match="temperature"):
        token_kl(torch.randn(2, 6), torch.randn(2, 6), temperature=0.0)
