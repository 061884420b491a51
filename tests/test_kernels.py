"""Triton kernels against the PyTorch reference, on CPU tensors through the Triton interpreter.

``conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports the kernel module. Shapes are small (the
interpreter runs each program in Python, ~ms per tile); they cover odd widths (not multiples of 32), ranks that are
not multiples of 32, both paths, bias, 1/3/8/64 tokens, deterministic split-K, the GEMM path at few tokens, the input
gradient (autograd of the custom op), fp16 range safety of the GEMM path, and strided/non-contiguous arguments.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6,<3.10' numpy)")
pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")

from hf_littlebit import LittleBitConfig, LittleBitLinear, set_backend  # noqa: E402
from hf_littlebit.backends.dispatch import select_backend  # noqa: E402
from hf_littlebit.backends.reference import torch_forward  # noqa: E402
from hf_littlebit.backends.triton import ENV_SPLIT_K, interpreter_enabled, load_kernels, split_k_for  # noqa: E402
from hf_littlebit.factorize import factorize  # noqa: E402

binary_lowrank = load_kernels()  # the kernel module, with the op's autograd formula registered

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


@pytest.mark.parametrize("tokens", [1, 3, 8, 64])
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
def test_split_k_decode_is_deterministic_and_agrees_with_one_split(split_k):
    """Splits of d_in store partial latents that stage 2 sums in a fixed order: repeated calls are bitwise equal, and
    split counts differ only by fp32 rounding."""
    layer = make_layer(200, 40, 24)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(3))
    one = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), split_k=1)
    many = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), split_k=split_k)
    again = binary_lowrank.binary_lowrank_linear(x, *op_args(layer), split_k=split_k)
    assert torch.equal(many, again)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    assert rel_err(many, reference(layer, x)) < TOL[torch.float32]


def test_split_k_is_reachable_from_the_layer(monkeypatch):
    """The layer's ``split_k`` attribute, else ``$LITTLEBIT_SPLIT_K``, reaches the decode launch."""
    seen = []
    launch = binary_lowrank._launch_gemv
    monkeypatch.setattr(binary_lowrank, "_launch_gemv", lambda *a: seen.append(a[-1]) or launch(*a))
    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)
    layer = make_layer(200, 40, 24)
    layer.backend = "triton"
    x = torch.randn(2, 200)
    monkeypatch.setenv(ENV_SPLIT_K, "2")
    y_env = layer(x)
    layer.split_k = 3
    y_attr = layer(x)
    assert seen == [2, 3] and split_k_for(layer) == 3
    torch.testing.assert_close(y_env, y_attr, rtol=1e-5, atol=1e-5)
    layer.split_k = 0  # the layer's explicit "automatic" wins over the environment too
    assert split_k_for(layer) == 0
    monkeypatch.setenv(ENV_SPLIT_K, "-1")
    del layer.split_k
    with pytest.raises(ValueError, match="non-negative"):
        layer(x)


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
    assert select_backend(layer, x) != "triton"  # auto on CPU tensors: never the kernels
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
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


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


def _layer_and_input_grads(layer, x, forward):
    x = x.clone().requires_grad_(True)
    y = forward(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()  # a non-uniform upstream gradient
    return y, x.grad


@pytest.mark.parametrize("tokens", [1, 12])
@pytest.mark.parametrize("d_in,d_out,rank", [(70, 45, 13), (33, 40, 40)])
@pytest.mark.parametrize("residual", [True, False])
def test_input_gradient_matches_the_reference(tokens, d_in, d_out, rank, residual):
    """The op's autograd formula: ∂L/∂x through both stages (decode and prefill launches) equals PyTorch's."""
    layer = make_layer(d_in, d_out, rank, residual)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(5))
    _, grad = _layer_and_input_grads(layer, x, lambda t: binary_lowrank.binary_lowrank_linear(t, *op_args(layer)))
    _, expected = _layer_and_input_grads(layer, x, lambda t: torch_forward(layer, t))
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def test_backward_through_a_triton_layer_with_checkpointing_and_compile(monkeypatch):
    """Adapters train through packed layers on the Triton backend: eager, gradient checkpointing, torch.compile."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)
    layer = make_layer(70, 45, 13)
    x = torch.randn(2, 3, 70, generator=torch.Generator().manual_seed(6))
    _, expected = _layer_and_input_grads(layer, x, lambda t: torch_forward(layer, t))
    layer.backend = "triton"
    for forward in (layer, lambda t: checkpoint(layer, t, use_reentrant=False),
                    torch.compile(layer, fullgraph=True, backend="aot_eager")):
        _, grad = _layer_and_input_grads(layer, x, forward)
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def test_gradient_for_a_packed_factor_is_refused():
    layer = make_layer(40, 24, 8, residual=False)
    args = op_args(layer)
    args[4] = args[4].detach().clone().requires_grad_(True)  # h
    y = binary_lowrank.binary_lowrank_linear(torch.randn(2, 40, requires_grad=True), *args)
    with pytest.raises(RuntimeError, match="gradient of the input only"):
        y.sum().backward()


def _all_plus_layer(d_in, d_out, rank, h):
    """Packed tensors of a layer whose signs are all +1 (zero words), g = l = 1 and h constant."""
    return [torch.zeros(rank, (d_in + 31) // 32, dtype=torch.int32), torch.ones(d_in), torch.ones(rank),
            torch.zeros(d_out, (rank + 31) // 32, dtype=torch.int32), torch.full((d_out,), h)] + [None] * 6


def test_fp16_prefill_has_no_intermediate_overflow():
    """The issue's repro: a stage-1 latent of 1024 · 70 = 71,680 exceeds fp16's range; the output (≈ 7.2) does not.
    The GEMM path must give the fp32 answer, like the decode path."""
    args = _all_plus_layer(1024, 16, 1, 1e-4)
    x = torch.full((12, 1024), 70.0)
    expected = binary_lowrank.binary_lowrank_linear(x, *args, force_gemm=True)
    for force_gemm in (True, False):
        y = binary_lowrank.binary_lowrank_linear(x[: 12 if force_gemm else 2].half(), *args, force_gemm=force_gemm)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), expected[: y.shape[0]], rtol=1e-3, atol=0)


def test_fp16_prefill_keeps_precision_of_tiny_products():
    """x ⊙ g ≈ 1e-6 lies in fp16's subnormal range (plain rounding: ~1.5 % error); the exact power-of-two rescale
    keeps fp16's relative precision."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(12, 64, generator=gen) * 1e-3).half()
    args = _all_plus_layer(64, 16, 8, 1.0)
    args[0] = torch.randint(-2**31, 2**31 - 1, (8, 2), dtype=torch.int32, generator=gen)
    args[3] = torch.randint(0, 255, (16, 1), dtype=torch.int32, generator=gen)
    args[1] = torch.full((64,), 1e-3)
    expected = binary_lowrank.binary_lowrank_linear(x.float(), *args)
    y = binary_lowrank.binary_lowrank_linear(x, *args)
    assert rel_err(y, expected) < 2e-3


def test_bf16_dot_is_gated_on_the_interpreter_not_the_dtype():
    assert binary_lowrank.dot_kind(torch.bfloat16, interpret=False) == binary_lowrank.DOT_BF16
    assert binary_lowrank.dot_kind(torch.bfloat16, interpret=True) == binary_lowrank.DOT_FP32
    assert binary_lowrank.dot_kind(torch.float16, interpret=True) == binary_lowrank.DOT_FP16
    assert binary_lowrank.dot_kind(torch.float32, interpret=False) == binary_lowrank.DOT_FP32


def test_launches_are_guarded_to_the_inputs_device():
    class OnSecondGpu:  # stands in for a CUDA tensor; entering the guard is not needed to see its device
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = binary_lowrank.launch_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(binary_lowrank.launch_guard(torch.zeros(1)), torch.cuda.device)


@pytest.mark.parametrize("tokens", [2, 12])
def test_strided_arguments_give_the_right_answer(tokens):
    """Row-strided and column-strided inputs, a packed shard cut out of wider rows of words, strided scales."""
    layer = make_layer(70, 45, 13)
    args = op_args(layer)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, 70, generator=gen)
    wide_rows = torch.randn(tokens, 100, generator=gen)
    wide_rows[:, 10:80] = x
    wide_words = torch.randint(-9, 9, (13, 7), dtype=torch.int32)
    wide_words[:, 2:5] = args[0]
    strided_g = torch.zeros(140)
    strided_g[::2] = args[1]
    args[0], args[1] = wide_words[:, 2:5], strided_g[::2]
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    expected = reference(layer, x)
    for xs in (wide_rows[:, 10:80], x.T.contiguous().T):
        assert rel_err(binary_lowrank.binary_lowrank_linear(xs, *args), expected) < TOL[torch.float32]


def test_packed_words_with_strided_columns_are_refused():
    layer = make_layer(70, 45, 13, residual=False)
    args = op_args(layer)
    args[0] = args[0].T.contiguous().T  # same values, column-major
    with pytest.raises(ValueError, match="contiguous words"):
        binary_lowrank.binary_lowrank_linear(torch.randn(2, 70), *args)
