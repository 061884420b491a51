"""The packed CPU backend against the PyTorch reference: C++ kernel (decode) and tiled GEMM (prefill).

Shapes are small and odd (widths and ranks not multiples of 32), both paths, bias, 1/3/8/13/64/512 tokens, 1 and 2
threads, fp32 and bf16 activations; plus the choice of backend, the fallback without a compiler, greedy decoding
against the reference, and that no per-layer dense copy is kept.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from hf_littlebit import LittleBitConfig, LittleBitLinear, set_backend
from hf_littlebit.backends import cpu as cpu_backend
from hf_littlebit.backends import tiled
from hf_littlebit.backends.dispatch import select_backend
from hf_littlebit.backends.reference import torch_forward
from hf_littlebit.factorize import factorize

from .conftest import with_threads

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None

pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the packed CPU kernel cannot be built")


def make_layer(d_in: int, d_out: int, rank: int, residual: bool, bias: bool, seed: int = 0) -> LittleBitLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen)
    layer = LittleBitLinear(d_in, d_out, rank, bias=bias, residual=residual)
    layer.set_factors_(factorize(weight, rank, method="littlebit", residual=residual, seed=seed))
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(d_out, generator=gen))
    return layer


def test_the_kernel_builds_where_a_compiler_exists():
    assert cpu_backend.cpu_kernel_available()


@pytest.mark.parametrize("width", [1, 7, 8, 31, 32, 33, 64, 70, 100])
def test_the_kernels_unpacking_equals_the_formats(width):
    from hf_littlebit.format.packing import unpack_signs

    bits = torch.randint(-2**31, 2**31 - 1, (5, (width + 31) // 32), dtype=torch.int64).int()
    unpacked = cpu_backend.load_kernel().unpack_signs_f32(bits, width)
    assert torch.equal(unpacked, unpack_signs(bits, width, torch.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 8, 13, 64, 512])
@pytest.mark.parametrize("d_in,d_out,rank,residual,bias", [
    (50, 30, 8, True, True),
    (67, 45, 37, False, True),
    (130, 200, 70, True, False),
    (33, 97, 40, False, False),
])
def test_cpu_backend_matches_the_reference(d_in, d_out, rank, residual, bias, tokens, threads):
    layer = make_layer(d_in, d_out, rank, residual, bias)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(tokens))
    out = with_threads(threads, cpu_backend.cpu_forward, layer, x)
    ref = torch_forward(layer, x)
    # fp32 sums in another order: the tolerance scales with the output's size
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_the_result_does_not_depend_on_the_thread_count():
    layer = make_layer(300, 260, 72, True, True)
    x = torch.randn(5, 300)
    assert torch.equal(with_threads(1, cpu_backend.cpu_forward, layer, x),
                       with_threads(2, cpu_backend.cpu_forward, layer, x))


@pytest.mark.parametrize("tokens", [2, 40])
def test_bf16_activations_and_leading_dims(tokens):
    layer = make_layer(64, 48, 24, True, True)
    x = torch.randn(2, tokens, 64).to(torch.bfloat16)
    out = cpu_backend.cpu_forward(layer, x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, tokens, 48)
    torch.testing.assert_close(out.float(), torch_forward(layer, x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_gradients_flow_to_the_input_as_through_the_reference(tokens, monkeypatch):
    """Adapters train through packed layers: the input gradient equals the reference path's (tiles of 8 rows)."""
    monkeypatch.setattr(tiled, "TILE_BYTES", 8 * 4 * 70)
    layer = make_layer(70, 90, 48, True, True)
    x = torch.randn(tokens, 70, requires_grad=True)
    weights = torch.randn(tokens, 90)
    (cpu_backend.cpu_forward(layer, x) * weights).sum().backward()
    got, x.grad = x.grad, None
    (torch_forward(layer, x) * weights).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5 * x.grad.abs().max().item())
    assert not any(p.requires_grad for p in layer.parameters())


def test_the_kernel_refuses_what_it_would_compute_wrongly():
    """Direct callers of the extension: paths of different ranks (the shared stage-1 buffer needs one rank)."""
    kernel = cpu_backend.load_kernel()
    a, b = make_layer(64, 32, 64, False, False), make_layer(64, 32, 40, False, False)
    tensors = tiled.path_tensors(a) + tiled.path_tensors(b)
    with pytest.raises(RuntimeError, match="same rank"):
        kernel.binary_lowrank_forward(torch.randn(1, 64), tensors, None, 0)


def test_a_packed_layer_whose_bias_trains_gets_its_gradient():
    """The kernels give the input gradient only; a packed layer whose own tensors ask for one runs the reference."""
    layer = make_layer(40, 24, 16, True, True)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, torch.full((24,), 3.0))
    assert x.grad is not None


@pytest.mark.parametrize("tokens", [3, 40])
def test_torch_compile_traces_the_packed_layer_in_one_graph(tokens):
    """Under ``torch.compile(fullgraph=True)`` the kernel is an opaque custom op and the backward traceable PyTorch:
    the same output and input gradient as eager."""
    layer = make_layer(70, 50, 24, True, True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(tokens, 70, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    got, x.grad = x.grad, None
    ref = layer(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-5)


def test_prefill_tiles_are_small_and_exact(monkeypatch):
    """The prefill path unpacks a few rows at a time (here 8); the result is the same as in one piece."""
    layer = make_layer(70, 90, 48, True, True)
    x = torch.randn(40, 70)
    whole = tiled.layer_forward(layer, x)
    monkeypatch.setattr(tiled, "TILE_BYTES", 8 * 4 * 70)
    rows = []
    unpack = tiled.unpack_signs
    monkeypatch.setattr(tiled, "unpack_signs", lambda bits, *a: rows.append(bits.shape[0]) or unpack(bits, *a))
    pieces = tiled.layer_forward(layer, x)
    assert max(rows) <= (8 * 4 * 70) // (4 * 48) and len(rows) > 4  # ≤ TILE_BYTES of fp32 per tile
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_auto_picks_the_packed_kernel_on_cpu_and_keeps_no_dense_copy():
    layer = make_layer(96, 80, 32, True, False)
    x = torch.randn(1, 96)
    assert select_backend(layer, x) == "cpu"
    layer(x)
    layer(torch.randn(100, 96))
    assert len(layer._sign_cache) == 0  # nothing derived from the packed words outlives the call
    layer.backend = "torch"  # the opt-in: folded fp32 factors cached for the layer's lifetime
    layer(x)
    assert len(layer._sign_cache) == 1


def test_moving_a_layer_frees_what_was_derived_on_the_old_device():
    layer = make_layer(40, 24, 16, True, False)
    layer.backend = "torch"
    layer(torch.randn(2, 40))
    assert len(layer._sign_cache) == 1
    layer.to("cpu")
    assert len(layer._sign_cache) == 0
    layer(torch.randn(2, 40))
    layer.to(torch.float32)
    assert len(layer._sign_cache) == 0


def test_without_a_compiler_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_state", {"module": None, "tried": False})

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", no_compiler)
    layer = make_layer(40, 24, 16, False, False)
    x = torch.randn(1, 40)
    with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required"):
        assert select_backend(layer, x) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every call
        assert select_backend(layer, x) == "torch"
        torch.testing.assert_close(layer(x), torch_forward(layer, x))
    layer.backend = "cpu"  # asked for explicitly: a clear error before any work, at any token count
    for tokens in (1, 40):
        with pytest.raises(RuntimeError, match="packed CPU kernel is not available"):
            layer(torch.randn(tokens, 40))


def test_greedy_generation_equals_the_reference(fp_checkpoint):
    """A quantized tiny Llama decodes the same tokens through the packed kernel as through the reference path,
    with logits within fp32 tolerance at every step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"),
                                                 quantization_config=LittleBitConfig(bpw=2.0))
    prompt = torch.tensor([[1, 5, 9, 17, 33]])
    runs = {}
    for backend in ("torch", "cpu"):
        set_backend(model, backend)
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        runs[backend] = out
    assert torch.equal(runs["torch"].sequences, runs["cpu"].sequences)
    for ref, got in zip(runs["torch"].logits, runs["cpu"].logits, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
