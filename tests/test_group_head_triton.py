"""The Triton kernel of the group-quantized tied head (``torch.ops.hf_littlebit.group_head``) against ``x @ Êᵀ``,
on CPU tensors through the Triton interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``): code widths whose codes
straddle words (3, 5 bits) and those that do not (2, 4, 8), hidden sizes the group size does not divide, 1–16
tokens (one and several token tiles), fp32/bf16/fp16 activations and scale dtypes; the dispatch from
``GroupQuantEmbedding.logits`` (``$LITTLEBIT_BACKEND``), and bad input refused with a message.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

import torch  # noqa: E402

from hf_littlebit.backends.dispatch import group_head_kernel  # noqa: E402
from hf_littlebit.backends.triton import interpreter_enabled  # noqa: E402
from hf_littlebit.nn.group_embedding import GroupQuantEmbedding  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest.py)")

VOCAB = 45  # not a multiple of the kernel's 32 rows per program


def embedding(bits: int, hidden: int, group_size: int, scale_dtype: torch.dtype = torch.float16
              ) -> GroupQuantEmbedding:
    weight = torch.randn(VOCAB, hidden, generator=torch.Generator().manual_seed(bits * 100 + hidden + group_size))
    emb = GroupQuantEmbedding(VOCAB, hidden, bits, group_size, scale_dtype=scale_dtype)
    emb.set_weight_(weight)
    return emb


def group_head(*args):
    from hf_littlebit.kernels.group_head import group_head

    return group_head(*args)


@pytest.mark.parametrize("bits, hidden, group_size", [(3, 40, 16), (5, 37, 8), (2, 64, 64), (4, 50, 12),
                                                      (8, 24, 8), (1, 33, 32), (6, 37, 16), (7, 45, 32)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 19])
def test_kernel_matches_the_decoded_matrix(bits, hidden, group_size, tokens):
    emb = embedding(bits, hidden, group_size)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
    want = x @ emb.dequantize_weight().T
    got = group_head(x, emb.codes, emb.scales, emb.zeros, bits, group_size)
    assert got.shape == (tokens, VOCAB) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_and_scales(x_dtype, scale_dtype):
    emb = embedding(3, 40, 16, scale_dtype)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    want = x.float() @ emb.dequantize_weight().T  # fp32 inside, one rounding to x's dtype at the end
    got = group_head(x, emb.codes, emb.scales, emb.zeros, 3, 16)
    assert got.dtype == x_dtype
    torch.testing.assert_close(got, want.to(x_dtype), rtol=1e-2, atol=1e-2)


def test_logits_dispatch_to_the_triton_kernel_only_when_asked_on_cpu(monkeypatch):
    """On CPU tensors the Triton kernel serves ``logits`` only with ``$LITTLEBIT_BACKEND=triton`` (the interpreter);
    ``torch`` keeps the chunked path; a gradient always takes the chunked path."""
    emb = embedding(3, 40, 16)
    x = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(1))
    want = x @ emb.dequantize_weight().T
    calls = []
    import hf_littlebit.backends.dispatch as dispatch

    real = dispatch.triton_group_head
    monkeypatch.setattr(dispatch, "triton_group_head", lambda e, xs: calls.append(xs.shape[0]) or real(e, xs))
    monkeypatch.setenv("LITTLEBIT_BACKEND", "triton")
    with torch.no_grad():
        torch.testing.assert_close(emb.logits(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [8]
    x.requires_grad_(True)
    torch.testing.assert_close(emb.logits(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [8]  # the gradient needs the chunked path
    monkeypatch.setenv("LITTLEBIT_BACKEND", "torch")
    assert group_head_kernel(emb, x.detach().reshape(-1, 40)) is None
    monkeypatch.delenv("LITTLEBIT_BACKEND")
    with torch.no_grad():
        emb.logits(x.detach())
    assert calls == [8]  # CPU tensors: never by default
    monkeypatch.setenv("LITTLEBIT_BACKEND", "triton")
    assert group_head_kernel(emb, torch.zeros(17, 40)) is None  # more tokens than the Triton head takes


def test_bad_input_is_refused_with_the_reason():
    emb = embedding(3, 40, 16)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="codes must be int32"):
        group_head(x, emb.codes[:, :-1].contiguous(), emb.scales, emb.zeros, 3, 16)
    with pytest.raises(ValueError, match="scales must be float"):
        group_head(x, emb.codes, emb.scales[:, :1].contiguous(), emb.zeros, 3, 16)
    with pytest.raises(ValueError, match="2-D float"):
        group_head(x.long(), emb.codes, emb.scales, emb.zeros, 3, 16)
