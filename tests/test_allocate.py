"""Global bit allocator: budget to the bit, determinism, sensitivity, and the quantizer path."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitLinear
from hf_littlebit.format.budget import stored_bits
from hf_littlebit.quantize.allocate import LayerShape, allocate_ranks, normalised_spectrum


def spectrum(n, decay):
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    return s * s / (s * s).sum()


def shapes():
    return [LayerShape("flat", 1024, 1024, spectrum(1024, 0.0)),
            LayerShape("steep", 1024, 1024, spectrum(1024, 1.5)),
            LayerShape("wide", 2048, 512, spectrum(512, 0.5))]


def total_bits(layers, ranks, residual):
    return sum(stored_bits(lay.d_in, lay.d_out, ranks[lay.name], residual) for lay in layers)


@pytest.mark.parametrize(("bpw", "residual"), [(0.3, False), (0.55, False), (0.55, True), (1.0, True), (2.0, True),
                                               (2.0, False)])
def test_budget_is_respected_to_the_bit_and_nearly_used(bpw, residual):
    layers = shapes()
    budget = int(bpw * sum(lay.d_in * lay.d_out for lay in layers))
    ranks = allocate_ranks(layers, budget, residual)
    used = total_bits(layers, ranks, residual)
    assert used <= budget
    assert all(r % 8 == 0 and 8 <= r <= min(lay.d_in, lay.d_out) for lay, r in zip(layers, ranks.values(), strict=True))
    # no single further step fits (or every layer is at its cap)
    for lay in layers:
        r = ranks[lay.name]
        if r + 8 <= min(lay.d_in, lay.d_out):
            step = stored_bits(lay.d_in, lay.d_out, r + 8, residual) - stored_bits(lay.d_in, lay.d_out, r, residual)
            assert used + step > budget
    assert allocate_ranks(layers, budget, residual) == ranks  # deterministic


def test_flat_spectra_get_more_rank_than_steep_ones():
    layers = shapes()
    budget = int(0.55 * sum(lay.d_in * lay.d_out for lay in layers))
    ranks = allocate_ranks(layers, budget, residual=False)
    assert ranks["flat"] > ranks["steep"]


def test_a_budget_below_min_rank_is_refused():
    with pytest.raises(ValueError, match="min_rank=8"):
        allocate_ranks(shapes(), 1000, residual=True)


def test_normalised_spectrum():
    w = torch.diag(torch.tensor([3.0, 4.0, 0.0]))
    torch.testing.assert_close(normalised_spectrum(w), torch.tensor([16 / 25, 9 / 25, 0.0], dtype=torch.float64))
    assert normalised_spectrum(torch.zeros(4, 4)).sum() == 0


def test_config_checks():
    with pytest.raises(ValueError, match="allocation must be one of"):
        LittleBitConfig(allocation="greedy")
    with pytest.raises(ValueError, match="kv_factor"):
        LittleBitConfig(allocation="auto", kv_factor=2.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_auto_allocation_through_from_pretrained_and_reload(arch, fp_checkpoint, tmp_path, tokens):
    config = LittleBitConfig(bpw=4.0, allocation="auto")
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint(arch), quantization_config=config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LittleBitLinear)}
    budget = int(4.0 * sum(m.in_features * m.out_features for m in layers.values()))
    used = sum(stored_bits(m.in_features, m.out_features, m.rank, m.residual) for m in layers.values())
    assert used <= budget
    assert model.config.quantization_config.layer_ranks == {n: m.rank for n, m in layers.items()}
    summary = hf_littlebit.summary(model)
    assert summary.bpw_true <= 4.0
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.allocation == "auto"
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    # the in-place API gives the same ranks
    fp = AutoModelForCausalLM.from_pretrained(fp_checkpoint(arch))
    same = hf_littlebit.quantize(fp, LittleBitConfig(bpw=4.0, allocation="auto"), progress=False)
    assert same.config.quantization_config.layer_ranks == model.config.quantization_config.layer_ranks
