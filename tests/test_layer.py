import pytest
import torch

from hf_littlebit import LittleBitLinear
from hf_littlebit.factorize import factorize


def make_layer(d_in, d_out, rank, residual=True, bias=True, scale_dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    layer = LittleBitLinear(d_in, d_out, rank, bias=bias, residual=residual, scale_dtype=scale_dtype)
    layer.set_factors_(factorize(w, rank, residual=residual, scale_dtype=scale_dtype))
    if bias:
        layer.bias.data = torch.randn(d_out, generator=gen)
    return layer, w


@pytest.mark.parametrize("d_in,d_out,rank", [(33, 17, 8), (64, 96, 24), (100, 45, 40), (7, 130, 5)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_the_reference_formula(d_in, d_out, rank, residual, bias):
    layer, _ = make_layer(d_in, d_out, rank, residual, bias)
    x = torch.randn(3, 5, d_in)
    y = layer(x)
    ref = x @ layer.dequantize_weight().T + (layer.bias if bias else 0)
    assert y.shape == (3, 5, d_out)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_layer_approximates_its_weight():
    layer, w = make_layer(128, 128, 64)
    rel = (layer.dequantize_weight() - w).norm() / w.norm()
    assert rel < 0.9


def test_bf16_input_is_computed_in_fp32_on_cpu_and_returned_in_bf16():
    layer, _ = make_layer(40, 24, 8)
    x = torch.randn(4, 40)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, layer(x.to(torch.bfloat16).float()).to(torch.bfloat16))


def test_signs_are_unpacked_once_and_invalidated_on_change():
    layer, _ = make_layer(40, 24, 8)
    x = torch.randn(2, 40)
    y0 = layer(x)
    u1, _ = layer.signs("", x.device, torch.float32)
    u2, _ = layer.signs("", x.device, torch.float32)
    assert u1 is u2
    with torch.no_grad():
        layer.u_bits.bitwise_not_()  # in place: bumps the version counter
    u3, _ = layer.signs("", x.device, torch.float32)
    assert u3 is not u1 and torch.equal(u3, -u1)
    assert not torch.allclose(layer(x), y0)


def test_state_dict_names_dtypes_and_bits():
    layer, _ = make_layer(70, 50, 16, residual=True, bias=True)
    sd = layer.state_dict()
    assert set(sd) == {
        "u_bits", "v_bits", "h", "l", "g", "res_u_bits", "res_v_bits", "res_h", "res_l", "res_g", "bias",
    }
    assert sd["u_bits"].dtype == torch.int32 and sd["u_bits"].shape == (50, 1)
    assert sd["v_bits"].shape == (16, 3)
    assert sd["h"].dtype == torch.float16
    assert all(not p.requires_grad for p in layer.parameters())
    assert layer.stored_bits() == layer.formula_bits()


def test_errors():
    layer, _ = make_layer(40, 24, 8)
    with pytest.raises(ValueError, match="last dim 40"):
        layer(torch.randn(2, 41))
    with pytest.raises(ValueError, match="rank"):
        LittleBitLinear(4, 4, 0)
    with pytest.raises(ValueError, match="factor shapes"):
        layer.set_factors_(factorize(torch.randn(24, 40), 16))


def test_backend_override(monkeypatch):
    layer, _ = make_layer(40, 24, 8)
    x = torch.randn(2, 40)
    monkeypatch.setenv("LITTLEBIT_BACKEND", "torch")
    y = layer(x)
    monkeypatch.setenv("LITTLEBIT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="unknown LittleBit backend 'cuda-magic'"):
        layer(x)
    monkeypatch.delenv("LITTLEBIT_BACKEND")
    # back to the default (on CPU the packed kernel, or PyTorch without a compiler): the same values up to fp32
    # summation order
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("LITTLEBIT_BACKEND", "torch")
    assert torch.equal(layer(x), y)  # the override is deterministic


def test_fp32_path_folds_scales_into_two_cached_matmuls():
    """On CPU a packed layer multiplies by two cached folded factors; they are rebuilt when any scale changes."""
    layer, _ = make_layer(50, 30, 8, residual=True)
    x = torch.randn(4, 50)
    y = layer(x)
    a, b = layer.folded_factors(x.device, torch.float32)
    assert a.shape == (16, 50) and b.shape == (30, 16)  # both paths side by side
    assert torch.allclose(b @ a, layer.dequantize_weight(), atol=1e-6)
    assert layer.folded_factors(x.device, torch.float32)[0] is a
    with torch.no_grad():
        layer.res_l.mul_(2)
    assert not torch.allclose(layer(x), y) and layer.folded_factors(x.device, torch.float32)[0] is not a
