"""Trainable mode of the layer: sign estimators, latent factors, gradients, packing back."""

from __future__ import annotations

import pytest
import torch

from hf_littlebit.factorize import factorize
from hf_littlebit.nn.estimators import ClippedSTE, SmoothSign, sign_estimator
from hf_littlebit.nn.layer import LittleBitLinear


def test_smoothsign_forward_is_sign_and_backward_is_tanh_derivative():
    x = torch.tensor([-0.05, -0.01, 0.0, 0.005, 0.02], requires_grad=True)
    y = SmoothSign.apply(x, 100.0)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    expected = 100.0 * (1 - torch.tanh(100.0 * x.detach()) ** 2)
    torch.testing.assert_close(x.grad, expected)
    assert x.grad[2] == pytest.approx(100.0)  # METHODS.md §1.3: gain 100 at 0, 42.0 at 0.01
    assert x.grad[1] == pytest.approx(42.0, abs=0.01)


def test_clipped_ste_passes_gradient_inside_the_clip_only():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.9, 1.5], requires_grad=True)
    ClippedSTE.apply(x, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    x.grad = None
    sign_estimator("ste", clip=float("inf"))(x).sum().backward()
    assert x.grad.tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="unknown sign estimator"):
        sign_estimator("tanh")


def _layer(residual: bool = True, bias: bool = True, scale_dtype=torch.float32) -> tuple[LittleBitLinear, list]:
    torch.manual_seed(0)
    w = torch.randn(40, 56)
    layer = LittleBitLinear(56, 40, rank=12, bias=bias, residual=residual, scale_dtype=scale_dtype)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.randn(40))
    paths = factorize(w, 12, residual=residual, scale_dtype=scale_dtype)
    return layer, paths


@pytest.mark.parametrize("residual", [True, False])
def test_trainable_forward_matches_packed_forward(residual):
    layer, paths = _layer(residual)
    x = torch.randn(3, 5, 56)
    layer.set_factors_(paths)
    packed_out = layer(x)
    layer.make_trainable_(paths)
    assert layer.is_trainable and not layer.is_packed
    assert "u_bits" not in dict(layer.named_parameters())
    torch.testing.assert_close(layer(x), packed_out)
    layer.pack_()
    assert layer.is_packed and not layer.is_trainable
    torch.testing.assert_close(layer(x), packed_out)
    assert not any(p.requires_grad for p in layer.parameters())


def test_gradients_reach_latents_and_scales_but_not_bias():
    layer, paths = _layer()
    layer.make_trainable_(paths, estimator="smoothsign")
    layer(torch.randn(4, 56)).pow(2).sum().backward()
    for prefix in ("", "res_"):
        for name in ("u_latent", "v_latent", "h", "l", "g"):
            grad = getattr(layer, prefix + name).grad
            assert grad is not None and grad.abs().sum() > 0, prefix + name
    assert layer.bias.grad is None and not layer.bias.requires_grad


def test_training_step_changes_signs_and_pack_keeps_them():
    layer, paths = _layer(residual=False)
    layer.make_trainable_(paths, estimator="ste", clip=float("inf"))
    before = torch.sign(layer.u_latent.detach()).clone()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(8, 56)).sum().backward()
    opt.step()
    flipped = (torch.sign(layer.u_latent.detach()) != before).sum().item()
    assert flipped > 0
    x = torch.randn(2, 56)
    trained = layer(x).detach()
    layer.pack_()
    torch.testing.assert_close(layer(x), trained)


def test_frozen_latents_signs_are_cached_and_follow_in_place_edits():
    """The end-to-end phase freezes the latents and tunes scales: their signs are taken once, not per forward, and
    an in-place change of a latent (or unfreezing it) is seen at once."""
    layer, paths = _layer(residual=False)
    layer.make_trainable_(paths, estimator="ste")
    x = torch.randn(3, 56)
    trained_ref = layer(x).detach()
    for name in ("u_latent", "v_latent"):
        getattr(layer, name).requires_grad_(False)
    out = layer(x)
    torch.testing.assert_close(out, trained_ref)
    out.sum().backward()
    assert layer.h.grad is not None and layer.u_latent.grad is None
    first = layer.latent_signs("", torch.float32)
    assert layer.latent_signs("", torch.float32)[0] is first[0]  # cached
    with torch.no_grad():
        layer.u_latent.neg_()
    torch.testing.assert_close(layer.latent_signs("", torch.float32)[0], -first[0])  # the version stamp moved
    layer.u_latent.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.u_latent.grad is not None  # unfrozen: through the estimator again


def test_make_trainable_from_packed_layer_keeps_the_function():
    layer, paths = _layer(scale_dtype=torch.float16)
    layer.set_factors_(paths)
    x = torch.randn(3, 56)
    ref = layer(x)
    layer.make_trainable_(estimator="smoothsign", alpha=100.0)
    assert layer.u_latent.abs().max().item() == pytest.approx(0.01)  # inside SmoothSign's sensitive band
    torch.testing.assert_close(layer(x), ref)
    layer.pack_()
    torch.testing.assert_close(layer(x), ref)


def test_trainable_mode_guards():
    layer, paths = _layer()
    with pytest.raises(ValueError, match="no packed factors"):
        LittleBitLinear(56, 40, rank=12, device="meta").make_trainable_()
    layer.make_trainable_(paths)
    with pytest.raises(ValueError, match="trainable mode"):
        layer.set_factors_(paths)
    with pytest.raises(ValueError, match="do not match"):
        LittleBitLinear(56, 40, rank=8).make_trainable_(paths)
    assert "trainable=smoothsign" in repr(layer)
