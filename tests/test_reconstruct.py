"""Calibrated block-wise reconstruction on tiny models: loss goes down, error propagation, resume, API parity."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitLinear, ReconstructionError
from hf_littlebit.quantize.reconstruct.capture import find_blocks
from hf_littlebit.quantize.reconstruct.driver import BlockReconstructor
from hf_littlebit.quantize.reconstruct.end_to_end import _AppendTeacher

from .conftest import make_tiny_model


def calib_tokens(n: int = 8, seqlen: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def cfg(**kw) -> LittleBitConfig:
    base = dict(bpw=1.0, calibration_samples=8, calibration_seqlen=24, calibration_steps=30,
                calibration_batch_size=4, calibration_lr=5e-2, calibration_scale_lr=2e-2)
    base.update(kw)
    return LittleBitConfig(**base)


def assert_same_state(a_model, b_model) -> None:
    """Both models hold the same tensors under the same names, bit for bit."""
    a, b = a_model.state_dict(), b_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_block_loss_decreases_and_beats_data_free(arch):
    fp = make_tiny_model(arch)
    held_out = calib_tokens(4, 24, seed=99)
    ref = logits(fp, held_out)

    calibrated = hf_littlebit.quantize(make_tiny_model(arch), cfg(), calibration=calib_tokens(), progress=False)
    report = calibrated.hf_quantizer.reconstruction
    assert len(report.blocks) == 2
    for block in report.blocks:
        assert block.layers > 0
        assert block.loss_after < block.loss_before
    data_free = hf_littlebit.quantize(make_tiny_model(arch), cfg(), progress=False)
    err_cal = (logits(calibrated, held_out) - ref).pow(2).mean()
    err_free = (logits(data_free, held_out) - ref).pow(2).mean()
    assert err_cal < err_free
    layers = [m for m in calibrated.modules() if isinstance(m, LittleBitLinear)]
    assert layers and all(layer.is_packed for layer in layers)
    assert calibrated.config.quantization_config.calibrated_with["samples"] == 8


def test_inputs_come_from_the_quantized_prefix_and_fp_weights_are_released(monkeypatch):
    model = make_tiny_model("llama")
    _, blocks = find_blocks(model)
    fp_weight = weakref.ref(blocks[0].self_attn.q_proj.weight)
    fp_block1_inputs = {}
    handle = blocks[1].register_forward_pre_hook(lambda m, a: fp_block1_inputs.setdefault("x", a[0].clone()))
    tokens = calib_tokens()
    logits(model, tokens[:4])
    handle.remove()

    seen = {}
    original = BlockReconstructor._run_block

    def spy(self, index, inputs, *args):
        seen[index] = inputs[0].clone()
        return original(self, index, inputs, *args)

    monkeypatch.setattr(BlockReconstructor, "_run_block", spy)
    hf_littlebit.quantize(model, cfg(), calibration=tokens, progress=False)
    gc.collect()
    assert fp_weight() is None  # the fp weights of converted layers are gone

    quantized_block1_inputs = {}
    handle = blocks[1].register_forward_pre_hook(lambda m, a: quantized_block1_inputs.setdefault("x", a[0].clone()))
    logits(model, tokens[:4])
    handle.remove()
    torch.testing.assert_close(seen[1], quantized_block1_inputs["x"])
    assert not torch.allclose(seen[1], fp_block1_inputs["x"], atol=1e-4)


@pytest.mark.parametrize(("targets", "e2e_steps"), [("quantized_inputs", 0), ("fp_inputs", 0),
                                                    ("quantized_inputs", 4)])
def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, monkeypatch, targets, e2e_steps):
    tokens = calib_tokens()

    def cfg(**kw):
        return globals()["cfg"](calibration_targets=targets, calibration_e2e_steps=e2e_steps, **kw)

    full = hf_littlebit.quantize(make_tiny_model("llama"), cfg(), calibration=tokens, progress=False,
                                 work_dir=tmp_path / "full")
    assert all(b.loss_after < b.loss_before for b in full.hf_quantizer.reconstruction.blocks)

    original = BlockReconstructor._run_block

    def crash_at_block_1(self, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, *args)

    monkeypatch.setattr(BlockReconstructor, "_run_block", crash_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        hf_littlebit.quantize(make_tiny_model("llama"), cfg(), calibration=tokens, progress=False,
                              work_dir=tmp_path / "run")
    monkeypatch.setattr(BlockReconstructor, "_run_block", original)

    with pytest.raises(ReconstructionError, match="resume"):
        hf_littlebit.quantize(make_tiny_model("llama"), cfg(), calibration=tokens, progress=False,
                              work_dir=tmp_path / "run")
    with pytest.raises(ReconstructionError, match="different run"):
        hf_littlebit.quantize(make_tiny_model("llama"), cfg(calibration_steps=5), calibration=tokens,
                              progress=False, work_dir=tmp_path / "run", resume=True)
    resumed = hf_littlebit.quantize(make_tiny_model("llama"), cfg(), calibration=tokens, progress=False,
                                    work_dir=tmp_path / "run", resume=True)
    assert resumed.hf_quantizer.reconstruction.resumed_from == 1
    assert_same_state(full, resumed)


def test_in_place_api_and_from_pretrained_agree_and_reload(fp_checkpoint, tmp_path):
    path = fp_checkpoint("qwen2")
    tokens = calib_tokens()
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg(calibration=tokens))
    in_place = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(path), cfg(), calibration=tokens,
                                     progress=False)
    assert_same_state(loaded, in_place)
    assert loaded.config.quantization_config.to_dict()["calibration"] is None  # data is never written

    in_place.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = calib_tokens(2, 10, seed=7)
    torch.testing.assert_close(logits(reloaded, ids), logits(in_place, ids))


def test_quantize_refuses_an_already_quantized_model():
    model = hf_littlebit.quantize(make_tiny_model("llama"), cfg(), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        hf_littlebit.quantize(model, cfg())


def test_default_calibration_uses_the_training_split(tiny_with_tokenizer, fake_cache, monkeypatch):
    monkeypatch.setenv("LITTLEBIT_CACHE", str(fake_cache))
    model = AutoModelForCausalLM.from_pretrained(tiny_with_tokenizer)
    hf_littlebit.quantize(model, cfg(calibration="default", calibration_samples=4, calibration_seqlen=16,
                                     calibration_steps=2), progress=False)
    qc = model.config.quantization_config
    assert qc.to_dict()["calibration"] == "default"
    assert qc.calibrated_with["source"].startswith("default")


def test_activations_spilled_to_disk_give_the_same_model(tmp_path):
    tokens = calib_tokens()
    in_memory = hf_littlebit.quantize(make_tiny_model("llama"), cfg(calibration_steps=5), calibration=tokens,
                                      progress=False)
    spilled = hf_littlebit.quantize(make_tiny_model("llama"), cfg(calibration_steps=5, calibration_offload_gib=0.0),
                                    calibration=tokens, progress=False, work_dir=tmp_path / "w")
    assert (tmp_path / "w" / "spill").is_dir()
    a, b = in_memory.state_dict(), spilled.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_the_teacher_hook_gives_the_fp_models_logits_from_its_last_hidden_states():
    fp = make_tiny_model("gemma3")  # final norm and logit soft-capping follow the blocks
    ids = calib_tokens(2, 16, seed=3)
    _, blocks = find_blocks(fp)
    seen = {}
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out[0] if isinstance(
        out, tuple) else out).clone())
    ref = logits(fp, ids)
    handle.remove()

    student = hf_littlebit.quantize(make_tiny_model("gemma3"), cfg(), progress=False)
    hook = _AppendTeacher()
    hook.teacher = seen["h"]
    handle = find_blocks(student)[1][-1].register_forward_hook(hook)
    both = logits(student, ids)
    handle.remove()
    assert both.shape[0] == 2 * ids.shape[0]
    torch.testing.assert_close(both[2:], ref)
    torch.testing.assert_close(both[:2], logits(student, ids))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_end_to_end_phase_lowers_the_kl_and_tunes_only_the_scales(arch):
    tokens = calib_tokens()
    blockwise = hf_littlebit.quantize(make_tiny_model(arch), cfg(calibration_steps=10), calibration=tokens,
                                      progress=False)
    assert blockwise.hf_quantizer.reconstruction.end_to_end is None
    tuned = hf_littlebit.quantize(make_tiny_model(arch), cfg(calibration_steps=10, calibration_e2e_steps=20,
                                                             calibration_e2e_lr=5e-2),
                                  calibration=tokens, progress=False)
    report = tuned.hf_quantizer.reconstruction.end_to_end
    assert report is not None and report.steps == 20
    assert report.kl_after < 0.9 * report.kl_before
    a, b = blockwise.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys()
    bits = [k for k in a if k.endswith("_bits")]
    scales = [k for k in a if k.rsplit(".", 1)[-1] in ("h", "l", "g") or k.endswith(("_h", "_l", "_g"))]
    assert bits and scales
    for key in bits:  # the same block-wise pass, then only scales move
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[key], b[key]) for key in scales)
    layers = [m for m in tuned.modules() if isinstance(m, LittleBitLinear)]
    assert layers and all(layer.is_packed and not layer.is_trainable for layer in layers)
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_end_to_end_phase_with_latents_flips_signs_and_resumes(arch, tmp_path):
    """``calibration_e2e_latents`` lets the phase move the ±1 factors too: some signs flip, the KL falls, the layers
    come back packed and frozen, and a finished block-wise pass resumes into it (the option is an end-to-end
    setting, outside the pass's fingerprint) giving the uninterrupted run's model. Whether it fits better than the
    scales alone is a matter of data and steps (BENCHMARKS.md), not a property of a tiny random model."""
    tokens = calib_tokens()
    # latents restart at ±0.5 from the packed signs; the forward changes only once one crosses zero, so the rate
    # (relative to their RMS) must add up to more than one over the steps: 20 × 0.2 × ~1/2 (cosine)
    base = dict(calibration_steps=10, calibration_lr=0.2, calibration_e2e_steps=20, calibration_e2e_lr=5e-2)
    scales_only = hf_littlebit.quantize(make_tiny_model(arch), cfg(**base), calibration=tokens, progress=False,
                                        work_dir=tmp_path / "w")
    with_latents = hf_littlebit.quantize(make_tiny_model(arch), cfg(**base, calibration_e2e_latents=True),
                                         calibration=tokens, progress=False)
    a, b = scales_only.hf_quantizer.reconstruction.end_to_end, with_latents.hf_quantizer.reconstruction.end_to_end
    assert a.kl_before == pytest.approx(b.kl_before)  # the same block-wise pass
    assert a.kl_after < a.kl_before and b.kl_after < b.kl_before
    sa, sb = scales_only.state_dict(), with_latents.state_dict()
    bits = [k for k in sa if k.endswith("_bits")]
    assert bits and any(not torch.equal(sa[k], sb[k]) for k in bits)
    layers = [m for m in with_latents.modules() if isinstance(m, LittleBitLinear)]
    assert layers and all(layer.is_packed and not layer.is_trainable for layer in layers)
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())

    resumed = hf_littlebit.quantize(make_tiny_model(arch), cfg(**base, calibration_e2e_latents=True),
                                    calibration=tokens, progress=False, work_dir=tmp_path / "w", resume=True)
    assert resumed.hf_quantizer.reconstruction.resumed_from == 2
    assert_same_state(with_latents, resumed)


def test_end_to_end_latents_flag_is_validated():
    with pytest.raises(ValueError, match="calibration_e2e_latents must be True or False"):
        LittleBitConfig(bpw=1.0, calibration_e2e_latents="yes")
