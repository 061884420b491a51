"""Triton kernels against the PyTorch reference, on CPU tensors through the Triton interpreter.

``conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports the kernel module. Shapes are small (the
interpreter runs each program in Python, ~ms per tile); they cover odd widths (not multiples of 32), ranks that are
not multiples of 32, both paths, bias, 1/3/64 tokens, split-K with atomics, and the GEMM path at few tokens.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6,<3.10' numpy)")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

from hf_littlebit import LittleBitConfig, LittleBitLinear, set_backend  # noqa: E402
from hf_littlebit.backends.dispatch import select_backend  # noqa: E402
from hf_littlebit.backends.reference import torch_forward  # noqa: E402
from hf_littlebit.backends.triton import interpreter_enabled  # noqa: E402
from hf_littlebit.factorize import factorize  # noqa: E402
from hf_littlebit.kernels import binary_lowrank  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest.py)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_layer(d_in, d_out, rank, residual=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    layer = LittleBitLinear(d_in, d_out, rank, bias=bias, residual=residual)
    layer.set_factors_(factorize(w, rank, residual=residual, seed=seed))
    if bias:
        layer.bias.data = torch.randn(d_out, generator=gen)
    return layer


def reference(layer, x):
    """fp32 reference from the dense reconstruction (independent of both backends' code)."""
    y = x.float() @ layer.dequantize_weight().T
    return y + layer.bias.float() if layer.bias is not None else y


def op_args(layer):
    names = ("v_bits", "g", "l", "u_bits", "h")
    args = [getattr(layer, n) for n in names]
    args += [getattr(layer, "res_" + n) for n in names] if layer.residual else [None] * 5
    return [*args, layer.bias]


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("d_in,d_out,rank", [(70, 45, 13), (96, 33, 40), (33, 100, 8)])
@pytest.mark.parametrize("residual,bias", [(True, True), (False, False)])
def test_kernels_match_the_reference(tokens, d_in, d_out, rank, residual, bias):
    layer = make_layer(d_in, d_out, rank, residual, bias)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1))
    y = binary_lowrank.binary_lowrank_linear(x, *op_args(layer))
    assert y.shape == (tokens, d_out) and y.dtype == torch.float32
    assert rel_err(y, reference(layer, x)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 20])
def test_half_precision_activations(dtype, tokens):
    """fp16 and bf16 in and out; inside, bf16 is only loaded and stored (all arithmetic in fp32 or fp16 dots)."""
    layer = make_layer(70, 45, 13)
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = binary_lowrank.binary_lowrank_linear(x, *op_args(layer))
    assert y.dtype == dtype
    assert rel_err(y, reference(layer, x)) < TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_decode_agrees_with_one_split(split_k):
    """More than one split of d_in sums the partial latents with fp32 atomics; the result must not change."""
    layer = make_layer(200, 40, 24)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(3))
    one = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), split_k=1)
    many = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), split_k=split_k)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    assert rel_err(many, reference(layer, x)) < TOL[torch.float32]


@pytest.mark.parametrize("tokens", [1, 5])
def test_gemm_path_at_few_tokens(tokens):
    """The prefill (``tl.dot``) kernels are also exact below the dispatcher's threshold (masked M tails)."""
    layer = make_layer(70, 45, 13)
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(4))
    y = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), force_gemm=True)
    assert rel_err(y, reference(layer, x)) < TOL[torch.float32]


def test_layer_backend_triton_matches_torch_and_is_chosen_explicitly(monkeypatch):
    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)
    layer = make_layer(70, 45, 13)
    x = torch.randn(2, 3, 70)
    assert select_backend(layer, x) == "torch"  # auto on CPU tensors: PyTorch
    layer.backend = "triton"
    assert select_backend(layer, x) == "triton"
    torch.testing.assert_close(layer(x), torch_forward(layer, x), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LITTLEBIT_BACKEND", "torch")  # the environment overrides the layer
    assert select_backend(layer, x) == "torch"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    layer = make_layer(40, 24, 8)
    layer.backend = "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        layer(torch.randn(1, 40))


def test_whole_model_on_the_triton_backend(fp_checkpoint, tokens):
    """A quantized tiny model gives the same logits through the kernels as through PyTorch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("qwen2"),
                                                 quantization_config=LittleBitConfig(bpw=1.0, backend="triton"))
    layers = [m for m in model.modules() if isinstance(m, LittleBitLinear)]
    assert layers and all(m.backend == "triton" for m in layers)
    assert "backend" not in model.config.quantization_config.to_dict()  # runtime choice, not saved
    with torch.no_grad():
        fast = model(tokens).logits
        assert set_backend(model, "torch") == len(layers)
        slow = model(tokens).logits
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_custom_op_compiles_without_graph_break():
    """``torch.compile(fullgraph=True)`` traces through the op (its fake implementation gives the shape)."""
    layer = make_layer(70, 45, 13)
    layer.backend = "triton"
    x = torch.randn(3, 70)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch_forward(layer, x) * 2, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.hf_littlebit.binary_lowrank_linear.default, (x, *op_args(layer)),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_get_clear_errors():
    layer = make_layer(40, 24, 8)
    args = op_args(layer)
    with pytest.raises(ValueError, match="must be 2-D"):
        binary_lowrank.binary_lowrank_linear(torch.randn(2, 3, 40), *args)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        binary_lowrank.binary_lowrank_linear(torch.ones(2, 40, dtype=torch.int64), *args)
    with pytest.raises(ValueError, match="do not match d_in=70"):
        binary_lowrank.binary_lowrank_linear(torch.randn(2, 70), *args)
    bad = list(args)
    bad[1] = torch.ones(39)
    with pytest.raises(ValueError, match="g has 39 entries, expected 40"):
        binary_lowrank.binary_lowrank_linear(torch.randn(2, 40), *bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        LittleBitConfig(backend="cuda")


def test_compiled_generate_with_static_cache_on_the_triton_backend():
    """The GPU recipe (static KV cache + ``torch.compile(fullgraph=True)``) traced through the kernels' custom op
    gives the same greedy tokens as eager PyTorch (inductor is replaced by ``aot_eager`` to keep the test fast)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_littlebit

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    hf_littlebit.quantize(model, LittleBitConfig(bpw=1.0, backend="torch"), progress=False)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    set_backend(model, "triton")
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(out, expected)
