"""Error-propagation mitigation inside block reconstruction: layers one at a time, each factorised from a weight the
block's loss has already tuned; the resume after an interruption inside a block still gives the identical model."""

from __future__ import annotations

import pytest
import torch

import hf_littlebit
from hf_littlebit import LittleBitConfig
from hf_littlebit.quantize.reconstruct import block_fit, driver

from .conftest import make_tiny_model
from .test_reconstruct import assert_same_state, calib_tokens, cfg, logits


def block_reports(config: LittleBitConfig):
    model = hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=calib_tokens(), progress=False)
    return model.hf_quantizer.reconstruction.blocks


def test_mitigation_lowers_the_loss_of_the_factorised_block():
    # no refinement steps: each block's loss is that of its layers as factorised, which mitigation makes lower
    plain = block_reports(cfg(method="dbf", dbf_iterations=5, calibration_steps=0))
    mitigated = block_reports(cfg(method="dbf", dbf_iterations=5, calibration_steps=0,
                                  calibration_mitigation_steps=10))
    assert all(m.loss_before < p.loss_before for m, p in zip(mitigated, plain, strict=True))


def test_layers_are_factorised_one_at_a_time_after_tuning_the_dense_rest(monkeypatch):
    calls = []
    original = block_fit.mitigate_block

    def spy(block, dense, *args, **kwargs):
        calls.append([tuple(layer.weight.shape) for layer in dense])
        before = [layer.weight.detach().clone() for layer in dense]
        original(block, dense, *args, **kwargs)
        # tuned, except before block 0's first factorisation: nothing is quantized yet, so the loss is exactly 0
        if len(calls) > 1:
            assert all(not torch.equal(b, layer.weight) for b, layer in zip(before, dense, strict=True))
        assert all(not layer.weight.requires_grad for layer in dense)  # frozen again

    monkeypatch.setattr(driver, "mitigate_block", spy)
    block_reports(cfg(method="lbadmm", dbf_iterations=5, calibration_steps=2, calibration_mitigation_steps=3))
    # 2 blocks × 7 Linears; before the k-th layer of a block, the 7 − k still dense ones are tuned
    assert len(calls) == 14
    assert [len(c) for c in calls[:7]] == [7, 6, 5, 4, 3, 2, 1]


def test_resume_after_an_interruption_inside_a_block_gives_the_identical_model(tmp_path, monkeypatch):
    config = cfg(method="lbadmm", dbf_iterations=5, calibration_steps=5, calibration_mitigation_steps=3,
                 calibration_fisher=True)
    tokens = calib_tokens()
    full = hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "full",
                                 progress=False)
    original = driver.mitigate_block
    seen = []

    def crash_inside_block_1(block, dense, *args, **kwargs):
        seen.append(len(dense))
        if len(seen) == 7 + 4:  # block 1, three layers already factorised
            raise KeyboardInterrupt
        return original(block, dense, *args, **kwargs)

    monkeypatch.setattr(driver, "mitigate_block", crash_inside_block_1)
    with pytest.raises(KeyboardInterrupt):
        hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "run",
                              progress=False)
    monkeypatch.setattr(driver, "mitigate_block", original)
    resumed = hf_littlebit.quantize(make_tiny_model("llama"), config, calibration=tokens, work_dir=tmp_path / "run",
                                    resume=True, progress=False)
    assert resumed.hf_quantizer.reconstruction.resumed_from == 1
    assert_same_state(full, resumed)
    ids = calib_tokens(2, 24, seed=99)
    assert torch.equal(logits(full, ids), logits(resumed, ids))


def test_config_validation():
    with pytest.raises(ValueError, match="calibration_mitigation_steps must be a non-negative integer"):
        LittleBitConfig(calibration_mitigation_steps=-1)
    with pytest.raises(ValueError, match="calibration_mitigation_lr must be a positive number"):
        LittleBitConfig(calibration_mitigation_lr=0)
