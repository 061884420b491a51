"""The CPU kernel of the group-quantized tied head (``group_head_forward`` in the packed CPU extension) against the
PyTorch chunked path and ``x @ Êᵀ``: every code width (straddling codes included), hidden sizes that the group size
does not divide, group sizes that are not multiples of 8 (the generic path), 1–37 tokens, fp32/bf16 activations and
scale dtypes; the dispatch from ``GroupQuantEmbedding.logits`` (and ``LITTLEBIT_CPU_KERNEL=0``), thread-count
independence, ``torch.compile``, and greedy generation of a whole tiny tied model with the kernel on and off.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch

import hf_littlebit
import hf_littlebit.nn.group_embedding as group_module
from hf_littlebit import LittleBitConfig
from hf_littlebit.backends import cpu as cpu_backend
from hf_littlebit.backends import dispatch
from hf_littlebit.nn.group_embedding import GroupQuantEmbedding

from .conftest import with_threads
from .test_whole_model import tiny

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
VOCAB = 203  # odd, so the last row (the generic path's, see the kernel) is one of many


@pytest.fixture(scope="module")
def kernel():
    if not HAS_COMPILER or cpu_backend.load_kernel() is None:
        pytest.skip("the packed CPU kernel cannot be built here")
    return cpu_backend.load_kernel()


@functools.cache
def embedding(bits: int, hidden: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
              vocab: int = VOCAB) -> GroupQuantEmbedding:
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(bits * 1000 + hidden + group_size))
    emb = GroupQuantEmbedding(vocab, hidden, bits, group_size, scale_dtype=scale_dtype)
    emb.set_weight_(weight)
    return emb


def kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LITTLEBIT_CPU_KERNEL=0`` as a fresh process would read it (the choice is read once, at the first use)."""
    monkeypatch.setenv("LITTLEBIT_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_backend, "_state", {"module": None, "tried": False})


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows decoded by the PyTorch path (the kernel decodes none through ``unpack_codes``)."""
    rows: list[int] = []
    real = group_module.unpack_codes
    monkeypatch.setattr(group_module, "unpack_codes", lambda words, *a: rows.append(words.shape[0]) or real(words, *a))
    return rows


# ---------------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("group_size", [16, 32, 64, 12])
@pytest.mark.parametrize("hidden", [50, 64, 96])
@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_equals_the_pytorch_path_and_the_dequantized_product(kernel, bits, hidden, group_size):
    emb = embedding(bits, hidden, group_size)
    dense = emb.dequantize_weight()
    gen = torch.Generator().manual_seed(hidden + bits)
    for tokens in (1, 3, 5, 16, 37):
        x = torch.randn(tokens, hidden, generator=gen)
        got = cpu_backend.group_head_forward(emb, x)
        ref = x @ dense.T
        tol = 2e-6 * ref.abs().max().item()  # fp32 sums in another order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=tol)
        torch.testing.assert_close(got, emb._head_forward(x), rtol=1e-5, atol=tol)
        # bf16 activations: computed in fp32 from the bf16 values, rounded once at the end
        xb = x.to(torch.bfloat16)
        got_b = cpu_backend.group_head_forward(emb, xb)
        assert got_b.dtype == torch.bfloat16
        ref_b = xb.float() @ dense.T
        torch.testing.assert_close(got_b.float(), ref_b, rtol=1e-2, atol=1e-2 * ref_b.abs().max().item())
        torch.testing.assert_close(got_b, emb._head_forward(xb), rtol=2e-2, atol=2e-2 * ref_b.abs().max().item())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_scales_stored_in_other_dtypes(kernel, scale_dtype):
    emb = embedding(3, 96, 32, scale_dtype)
    x = torch.randn(2, 96)
    ref = x @ emb.dequantize_weight().T
    torch.testing.assert_close(cpu_backend.group_head_forward(emb, x), ref, rtol=1e-5,
                               atol=2e-6 * ref.abs().max().item())


def test_the_result_does_not_depend_on_the_thread_count(kernel, monkeypatch):
    monkeypatch.setattr(cpu_backend, "MIN_PARALLEL_CODES", 0)  # small shapes would otherwise run on one thread
    emb = embedding(5, 96, 32, vocab=700)
    x = torch.randn(3, 96)
    assert torch.equal(with_threads(1, cpu_backend.group_head_forward, emb, x),
                       with_threads(2, cpu_backend.group_head_forward, emb, x))


def test_the_kernel_refuses_mismatched_tensors(kernel):
    emb = embedding(4, 64, 16)
    with pytest.raises(RuntimeError, match="codes width"):
        kernel.group_head_forward(torch.randn(1, 80), emb.codes, emb.scales, emb.zeros, 4, 16, 0)
    with pytest.raises(RuntimeError, match="shape \\(rows, groups\\)"):
        kernel.group_head_forward(torch.randn(1, 64), emb.codes, emb.scales[:, :2], emb.zeros, 4, 16, 0)


# ---------------------------------------------------------------------------------------------------- dispatch
def test_logits_dispatch_to_the_kernel_for_few_tokens_without_gradient(kernel, monkeypatch):
    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)  # "torch" would keep the chunked path
    emb = embedding(4, 64, 16)
    dense = emb.dequantize_weight()
    rows = count_decodes(monkeypatch)
    x = torch.randn(2, 8, 64)  # 16 tokens, in two sequences
    with torch.no_grad():
        logits = emb.logits(x)
    assert rows == [] and logits.shape == (2, 8, VOCAB)
    torch.testing.assert_close(logits, x @ dense.T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        emb.logits(torch.randn(cpu_backend.GROUP_HEAD_MAX_TOKENS + 1, 64))  # more tokens: decode + GEMM
    assert sum(rows) == VOCAB
    rows.clear()
    x.requires_grad_(True)  # a gradient asked for: the chunked path and its backward
    emb.logits(x).sum().backward()
    assert sum(rows) == 2 * VOCAB and x.grad is not None
    with pytest.raises(ValueError, match="hidden size 48"):
        emb.logits(torch.randn(1, 48))


def test_kernel_switched_off_leaves_the_pytorch_path(monkeypatch):
    kernel_off(monkeypatch)
    called = []
    monkeypatch.setattr(dispatch, "group_head_forward", lambda *a: called.append(1))
    rows = count_decodes(monkeypatch)
    emb = embedding(3, 50, 16)
    x = torch.randn(1, 50)
    with torch.no_grad():
        logits = emb.logits(x)
    assert called == [] and sum(rows) == VOCAB
    torch.testing.assert_close(logits, x @ emb.dequantize_weight().T, rtol=1e-5, atol=1e-5)


def test_torch_compile_runs_the_kernel_as_one_op(kernel):
    emb = embedding(6, 64, 32)
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda t: emb.logits(t), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), emb.logits(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- in a model
@pytest.mark.parametrize("bits", [3, 4])
def test_greedy_generation_is_the_same_with_the_kernel_on_and_off(kernel, monkeypatch, bits):
    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)
    model = hf_littlebit.quantize(tiny("llama_tied"), LittleBitConfig(bpw=4.0, whole_model=True, embedding_bits=bits,
                                                                      embedding_group_size=16), progress=False)
    assert isinstance(model.get_input_embeddings(), GroupQuantEmbedding)
    prompt = torch.tensor([[1, 5, 9, 17, 33]])

    def generate():
        return model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)

    calls = []
    real = dispatch.group_head_forward
    with monkeypatch.context() as patch:
        patch.setattr(dispatch, "group_head_forward", lambda *a: calls.append(1) or real(*a))
        on = generate()
    assert len(calls) == 12  # every step's head ran the kernel
    kernel_off(monkeypatch)  # the packed linears fall back too: the whole model's kernel-less path
    off = generate()
    assert torch.equal(on.sequences, off.sequences)
    for a, b in zip(on.logits, off.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
