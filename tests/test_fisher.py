"""Output-gradient Fisher statistics, output-side preconditioning and the Fisher-weighted block loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitLinear
from hf_littlebit.factorize import factorize, relative_error
from hf_littlebit.quantize.fisher import gradient_second_moments
from hf_littlebit.quantize.reconstruct.block_fit import block_loss
from hf_littlebit.quantize.reconstruct.capture import find_blocks

from .conftest import make_tiny_model
from .test_reconstruct import assert_same_state, calib_tokens, cfg, logits


def test_statistics_are_the_clipped_shrunk_mean_squared_output_gradient():
    model = make_tiny_model("llama")
    _, blocks = find_blocks(model)
    name = "model.layers.1.mlp.down_proj"
    tokens = calib_tokens(4, 16)
    stats = gradient_second_moments(model, blocks, {name: model.get_submodule(name)}, tokens, batch_size=2,
                                    clip_quantile=1.0, shrinkage=0.0, progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no parameter gradient, flags kept
    # the reference: autograd on the layer's output, both batches, no clipping, no shrinkage
    grads = []
    def keep_gradient(module, args, out):
        out.register_hook(lambda g: grads.append(g.detach().reshape(-1, g.shape[-1])))

    handle = model.get_submodule(name).register_forward_hook(keep_gradient)
    for start in (0, 2):
        ids = tokens[start:start + 2]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    handle.remove()
    expected = torch.cat(grads).pow(2).mean(0)
    torch.testing.assert_close(stats.linear_out[name], expected, rtol=1e-5, atol=1e-12)
    assert len(stats.block_out) == 2 and stats.block_out[0].shape == (64,)

    shrunk = gradient_second_moments(model, blocks, {name: model.get_submodule(name)}, tokens, batch_size=2,
                                     clip_quantile=1.0, shrinkage=0.5, progress=False).linear_out[name]
    torch.testing.assert_close(shrunk, 0.5 * expected + 0.5 * expected.mean(), rtol=1e-5, atol=1e-12)
    clipped = gradient_second_moments(model, blocks, {name: model.get_submodule(name)}, tokens, batch_size=2,
                                      clip_quantile=0.5, shrinkage=0.0, progress=False).linear_out[name]
    assert clipped.sum() < expected.sum()  # the largest tokens were scaled down to the median


def test_output_importance_weights_the_fit_toward_important_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    importance = torch.ones(48)
    importance[:8] = 100.0  # eight output channels matter a hundred times more

    def weighted_error(paths):
        err = w - sum(p.reconstruct() for p in paths)
        return (importance[:, None] * err.pow(2)).sum().item()

    plain = factorize(w, 16, method="dbf", residual=False, seed=0)
    aware = factorize(w, 16, method="dbf", residual=False, seed=0, output_importance=importance)
    assert weighted_error(aware) < 0.9 * weighted_error(plain)
    # a uniform importance changes nothing (few iterations: over 100, DBF's sign flips amplify rounding differences
    # into a different local optimum of the same quality)
    short = {"n_iter": 5}
    uniform = factorize(w, 16, method="dbf", residual=False, seed=0, output_importance=torch.full((48,), 3.0),
                        options=short)
    assert relative_error(w, uniform) == pytest.approx(
        relative_error(w, factorize(w, 16, method="dbf", residual=False, seed=0, options=short)), rel=1e-4)
    with pytest.raises(ValueError, match="output_importance has 5 entries"):
        factorize(w, 16, output_importance=torch.ones(5))


def test_weighted_block_loss():
    y, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(block_loss(y, t, "token_normalized", torch.full((8,), 7.0)),
                               block_loss(y, t, "token_normalized"))
    w = torch.zeros(8)
    w[0] = 1.0
    expected = ((y[..., 0] - t[..., 0]).pow(2) / t[..., 0].pow(2)).mean()
    torch.testing.assert_close(block_loss(y, t, "token_normalized", w), expected)


def test_fisher_calibration_runs_and_resumes_from_its_saved_statistics(tmp_path, monkeypatch):
    from hf_littlebit.quantize.reconstruct import driver

    config = cfg(calibration_fisher=True, method="dbf", dbf_iterations=5, calibration_steps=10)
    tokens = calib_tokens()
    full = hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "full",
                                 progress=False)
    stats = load_file(str(tmp_path / "full" / "curvature.safetensors"))
    assert {k for k in stats if k.startswith("block.")} == {"block.0", "block.1"}
    assert len([k for k in stats if k.startswith("linear.")]) == 14
    assert all(b.loss_after < b.loss_before for b in full.hf_quantizer.reconstruction.blocks)

    original = driver.BlockReconstructor._run_block

    def crash_at_block_1(self, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, *args)

    monkeypatch.setattr(driver.BlockReconstructor, "_run_block", crash_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "run",
                              progress=False)
    monkeypatch.setattr(driver.BlockReconstructor, "_run_block", original)

    def no_second_pass(*args, **kwargs):  # block 0 is quantized now: the statistics must come from the folder
        raise AssertionError("the Fisher pass ran again on a partly quantized model")

    monkeypatch.setattr(driver, "gradient_second_moments", no_second_pass)
    resumed = hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "run",
                                    resume=True, progress=False)
    assert resumed.hf_quantizer.reconstruction.resumed_from == 1
    assert_same_state(full, resumed)
    ids = calib_tokens(2, 24, seed=99)
    assert torch.equal(logits(full, ids), logits(resumed, ids))
    assert all(isinstance(m, LittleBitLinear) for n, m in resumed.named_modules() if n.endswith("q_proj"))


def test_config_validation():
    with pytest.raises(ValueError, match="calibration_fisher must be True or False"):
        LittleBitConfig(calibration_fisher="yes")
    with pytest.raises(ValueError, match=r"calibration_fisher_shrinkage must be a number in \[0, 1\]"):
        LittleBitConfig(calibration_fisher_shrinkage=1.5)
