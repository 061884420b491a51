"""``dense_save_dtype``: the tensors outside the packed layers are saved narrower, the packed tensors keep their format,
a tied embedding stays one tensor, the model in memory is untouched, and a reload computes what the rounded model
computes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig
from hf_littlebit.integrations.dense_dtype import cast_dense_remainder, round_dense_remainder_

from .test_whole_model import ids, tiny


def header(folder) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 - no iteration protocol


@pytest.mark.parametrize("arch, whole_model", [("llama_tied", False), ("qwen2", False), ("llama_tied", True)])
def test_saved_narrow_and_reload_matches_the_rounded_model(arch, whole_model, tmp_path):
    model = hf_littlebit.quantize(tiny(arch), LittleBitConfig(bpw=2.0, whole_model=whole_model), progress=False)
    model.save_pretrained(tmp_path / "wide")
    model.config.quantization_config.dense_save_dtype = "bfloat16"
    tokens = ids()
    with torch.no_grad():
        before = model(tokens).logits
    model.save_pretrained(tmp_path / "narrow")
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)  # saving did not touch the model
    wide, narrow = header(tmp_path / "wide"), header(tmp_path / "narrow")
    assert set(wide) == set(narrow)  # a tied embedding is still stored once
    packed = tuple(f"{n}." for n in hf_littlebit.nn.layer.littlebit_layers(model))
    for key, dtype in narrow.items():
        if key.startswith(packed):
            assert dtype == wide[key], key  # bits, fp16 scales: their own format
        else:
            assert dtype == ("BF16" if wide[key] == "F32" else wide[key]), key
    assert any(not k.startswith(packed) for k in narrow)  # there was a remainder to narrow (norms at least)
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("wide", "narrow")}
    assert size["narrow"] < size["wide"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")  # config.json keeps the model's fp32
    assert reloaded.dtype == torch.float32
    assert reloaded.config.quantization_config.dense_save_dtype == "bfloat16"
    assert round_dense_remainder_(model, torch.bfloat16) > 0
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    assert round_dense_remainder_(model, torch.bfloat16) == 0  # idempotent


def test_cast_keeps_shared_tensors_shared():
    model = tiny("llama_tied")
    state = cast_dense_remainder(model, model.state_dict(), torch.float16)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert state["lm_head.weight"].dtype == torch.float16
    assert model.lm_head.weight.dtype == torch.float32


def test_bad_dense_save_dtype_names_the_field():
    with pytest.raises(ValueError, match="dense_save_dtype must be None or one of"):
        LittleBitConfig(dense_save_dtype="int8")
    assert LittleBitConfig(dense_save_dtype=torch.bfloat16).dense_save_dtype == "bfloat16"
