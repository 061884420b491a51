"""Quantize on load → forward → save → reload (in a fresh process) on tiny models of four architectures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitLinear
from hf_littlebit.factorize import factorize
from hf_littlebit.quantize.layers import layer_seed

ARCHS = ["llama", "qwen2", "opt", "gemma3"]

RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
    import hf_littlebit
    from transformers import AutoModelForCausalLM
    ref = load_file(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert any(isinstance(m, hf_littlebit.LittleBitLinear) for m in model.modules()), "no LittleBit layers"
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    print("dtype", logits.dtype, "equal", torch.equal(logits, ref["logits"]))
    sys.exit(0 if torch.equal(logits, ref["logits"]) else 1)
    """
)


def quantize(fp_dir, **kwargs):
    cfg_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in LittleBitConfig.__init__.__code__.co_varnames}
    return AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LittleBitConfig(**cfg_kwargs), **kwargs)


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_reload_in_fresh_process(arch, dtype, fp_checkpoint, tmp_path, tokens):
    fp_dir = fp_checkpoint(arch)
    fp_model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype)
    model = quantize(fp_dir, bpw=1.0, dtype=dtype)

    # every decoder Linear converted, the LM head kept, biases kept bit-exactly
    converted = hf_littlebit.nn.layer.littlebit_layers(model)
    assert set(converted) == linear_names(fp_model) - {"lm_head"}
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert set(model.config.quantization_config.layer_ranks) == set(converted)
    for name, layer in converted.items():
        src = fp_model.get_submodule(name)
        if src.bias is not None:
            assert torch.equal(layer.bias, src.bias) and layer.bias.dtype == dtype
        assert layer.h.dtype == torch.float16 and not layer.h.requires_grad

    # the op packed exactly what the factoriser gives for the checkpoint's weight
    name, layer = next(iter(converted.items()))
    cfg = model.config.quantization_config
    paths = factorize(fp_model.get_submodule(name).weight, layer.rank, residual=True,
                      seed=layer_seed(cfg.seed, name), scale_dtype=torch.float16)
    assert torch.equal(layer.dequantize_weight(), sum(p.reconstruct() for p in paths))

    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()

    out = tmp_path / "q"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "littlebit"

    # bytes of the quantized layers on disk match the reported true bits (+ bias) within 1 %
    with safe_open(out / "model.safetensors", framework="pt") as f:
        on_disk = 0
        for key in f.keys():
            if key.rsplit(".", 1)[0] in converted:
                t = f.get_tensor(key)
                on_disk += t.numel() * t.element_size()
        assert f.metadata()["littlebit_format"] == "1"
    reported = hf_littlebit.summary(model).converted_bytes
    assert abs(on_disk - reported) <= 0.01 * reported

    ref = tmp_path / "ref.safetensors"
    save_file({"tokens": tokens, "logits": logits.contiguous()}, ref)
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(out), str(ref)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_same_process_reload_device_map_and_generate(fp_checkpoint, tmp_path, tokens):
    model = quantize(fp_checkpoint("llama"), bpw=0.55)
    out = tmp_path / "q"
    model.save_pretrained(out)
    with torch.no_grad():
        ref = model(tokens).logits
        for device_map in (None, "cpu", "auto"):
            again = AutoModelForCausalLM.from_pretrained(out, device_map=device_map)
            assert torch.equal(again(tokens).logits, ref), device_map
    on_the_fly_auto = quantize(fp_checkpoint("llama"), bpw=0.55, device_map="auto")
    assert torch.equal(on_the_fly_auto(tokens).logits, ref)
    generated = again.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_summary_table_and_totals(fp_checkpoint):
    model = quantize(fp_checkpoint("llama"), bpw=1.0)
    report = hf_littlebit.summary(model)
    assert len(report.layers) == 14 and all(r.rank == 8 for r in report.layers)
    layer = report.layers[0]  # q_proj 64x64 rank 8, two paths
    assert layer.bpw_paper == pytest.approx(1.5625)
    assert layer.bpw_true == pytest.approx(2 * (64 * 32 + 8 * 64 + 16 * (64 + 8 + 64)) / 4096)  # U padded to 32 bits
    all_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert report.model_bytes == all_bytes
    assert report.model_bytes < report.model_bytes_fp16
    text = str(report)
    assert "converted layers (14)" in text and "model.layers.1.mlp.down_proj" in text
    assert report.to_dict()["bpw_true"] == report.bpw_true


def test_kv_factor_and_multipliers_change_recorded_ranks(fp_checkpoint):
    plain = quantize(fp_checkpoint("llama"), bpw=4.0).config.quantization_config.layer_ranks
    kv = quantize(fp_checkpoint("llama"), bpw=4.0, kv_factor=2.0,
                  bpw_multipliers={r"mlp\.down_proj$": 0.5}).config.quantization_config.layer_ranks
    k = "model.layers.0.self_attn.k_proj"
    down = "model.layers.0.mlp.down_proj"
    assert plain[k] == 16 and kv[k] == 32
    assert kv[down] < plain[down]
    assert kv["model.layers.0.self_attn.q_proj"] == plain["model.layers.0.self_attn.q_proj"]


def test_tied_and_user_skip_lists_are_resolved_and_saved(fp_checkpoint, tmp_path):
    opt = quantize(fp_checkpoint("opt"), bpw=1.0)
    skip = opt.config.quantization_config.modules_to_not_convert
    assert "lm_head" in skip and isinstance(opt.lm_head, torch.nn.Linear)
    assert opt.lm_head.weight is opt.model.decoder.embed_tokens.weight  # tie preserved
    custom = quantize(fp_checkpoint("llama"), bpw=1.0, modules_to_not_convert=["lm_head", "down_proj"])
    assert isinstance(custom.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(custom.model.layers[0].mlp.up_proj, LittleBitLinear)
    custom.save_pretrained(tmp_path / "c")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert isinstance(again.model.layers[1].mlp.down_proj, torch.nn.Linear)


def test_small_layers_fall_back_to_min_rank_with_a_warning(fp_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        model = quantize(fp_checkpoint("llama"), bpw=0.1, min_rank=8)
    assert "too small for bpw=0.1" in caplog.text and "min_rank=8" in caplog.text
    assert set(model.config.quantization_config.layer_ranks.values()) == {8}
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        big = quantize(fp_checkpoint("llama"), bpw=16.0, residual=False)
    assert "capped" in caplog.text
    assert big.config.quantization_config.layer_ranks["model.layers.0.self_attn.k_proj"] == 32


def test_nan_weight_is_an_error_naming_the_layer(fp_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(Exception, match=r"(?s)model\.layers\.1\.mlp\.up_proj.*NaN"):
        quantize(tmp_path / "nan", bpw=1.0)


def test_dequantize_gives_dense_linears_with_the_same_function(fp_checkpoint, tokens):
    model = quantize(fp_checkpoint("qwen2"), bpw=1.0)
    with torch.no_grad():
        ref = model(tokens).logits
        model.dequantize()
        assert not hf_littlebit.nn.layer.littlebit_layers(model)
        assert torch.allclose(model(tokens).logits, ref, atol=1e-4, rtol=1e-4)


def test_progress_bar_follows_transformers_switch(fp_checkpoint, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        quantize(fp_checkpoint("llama"), bpw=1.0)
        assert "LittleBit quantizing" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
    quantize(fp_checkpoint("llama"), bpw=1.0)
    assert "LittleBit quantizing" in capsys.readouterr().err


def test_summary_reports_whole_model_bits_per_parameter(fp_checkpoint):
    """Next to the converted layers' bpw, the bits per parameter of everything the model holds, over the parameter
    count of the model before quantization."""
    path = fp_checkpoint("qwen2")  # biases on q/k/v: counted as parameters of the dense model
    dense_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=0.55))
    report = hf_littlebit.summary(model)
    assert report.model_params == dense_params
    assert report.bpw_whole_model == pytest.approx(8 * report.model_bytes / dense_params)
    assert f"{report.bpw_whole_model:.2f} bits per parameter" in str(report)
