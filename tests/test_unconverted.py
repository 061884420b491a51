"""Weights LittleBit does not convert (MoE routers, other non-Linear weights) are named, not silently left dense."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig

Qwen3MoeConfig = pytest.importorskip("transformers").Qwen3MoeConfig


def tiny_moe(path):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=64, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("way", ["on_load", "in_place"])
def test_routers_are_named_in_a_warning_and_in_the_summary_and_experts_are_converted(tmp_path, caplog, way):
    """Fused experts are packed since issue 21 (tests/test_moe.py); the MoE routers (a bare 2-D ``weight``, not an
    nn.Linear) still stay dense, and are named instead of silently left out of the reported bpw."""
    path = tiny_moe(tmp_path / "moe")
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        if way == "on_load":
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0))
        else:
            model = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(path), LittleBitConfig(bpw=1.0))
    assert "not nn.Linear and stay in full precision" in caplog.text
    assert "model.layers.0.mlp.gate.weight" in caplog.text and "Qwen3MoeTopKRouter" in caplog.text
    assert "experts" not in caplog.text.split("Fused MoE experts are converted")[0]
    report = hf_littlebit.summary(model)
    assert set(report.unconverted) == {f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)}
    dense = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    total = sum(p.numel() for p in model.parameters())
    assert report.unconverted_share == pytest.approx(dense / total)
    assert "not converted (dense): 2 weight tensors" in str(report)


def test_a_dense_model_reports_nothing_unconverted(fp_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"), quantization_config=LittleBitConfig())
    assert "stay in full precision" not in caplog.text
    report = hf_littlebit.summary(model)
    assert report.unconverted == {} and "not converted" not in str(report)
