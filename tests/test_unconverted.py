"""Weights LittleBit cannot convert (fused MoE experts of Transformers 5) are named, not silently left dense."""

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
def test_fused_experts_are_named_in_a_warning_and_in_the_summary(tmp_path, caplog, way):
    path = tiny_moe(tmp_path / "moe")
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        if way == "on_load":
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0))
        else:
            model = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(path), LittleBitConfig(bpw=1.0))
    assert "not nn.Linear and stay in full precision" in caplog.text
    assert "model.layers.0.mlp.experts.gate_up_proj" in caplog.text and "Qwen3MoeExperts" in caplog.text
    report = hf_littlebit.summary(model)
    # the fused experts and the routers (Qwen3MoeTopKRouter holds a bare weight, not an nn.Linear)
    assert set(report.unconverted) == {f"model.layers.{i}.mlp.{n}" for i in (0, 1)
                                       for n in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")}
    dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or ".gate." in n)
    total = sum(p.numel() for p in model.parameters())
    assert report.unconverted_share == pytest.approx(dense / total)
    assert "not converted (dense): 6 weight tensors" in str(report)


def test_a_dense_model_reports_nothing_unconverted(fp_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"), quantization_config=LittleBitConfig())
    assert "stay in full precision" not in caplog.text
    report = hf_littlebit.summary(model)
    assert report.unconverted == {} and "not converted" not in str(report)
