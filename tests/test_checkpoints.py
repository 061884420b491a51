"""Saved checkpoints: corrupt or mismatched folders, failed saves, missing plugin import, Hub upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto

import hf_littlebit
from hf_littlebit import LittleBitCheckpointError, LittleBitConfig, NotALittleBitModelError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fp_checkpoint):
    """A quantized tiny Llama saved once; tests copy it before editing."""
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"),
                                                 quantization_config=LittleBitConfig(bpw=0.55))
    out = tmp_path_factory.mktemp("saved") / "q"
    model.save_pretrained(out)
    return out


@pytest.fixture
def copy_of(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def test_rank_mismatch_between_config_and_tensors_is_refused(copy_of):
    edit_config(copy_of, lambda q: q["layer_ranks"].update({"model.layers.0.mlp.up_proj": 16}))
    expected = r"model\.layers\.0\.mlp\.up_proj\.l: found F16\[8\], expected F16\[16\]"
    with pytest.raises(LittleBitCheckpointError, match=expected):
        AutoModelForCausalLM.from_pretrained(copy_of)


def test_missing_packed_tensor_is_refused(copy_of):
    tensors = load_file(copy_of / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.res_v_bits"]
    save_file(tensors, copy_of / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LittleBitCheckpointError, match=r"o_proj\.res_v_bits: missing"):
        AutoModelForCausalLM.from_pretrained(copy_of)


def test_wrong_dtype_and_unknown_layer_and_no_ranks_are_refused(copy_of, tmp_path):
    tensors = load_file(copy_of / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.h"] = tensors["model.layers.0.mlp.up_proj.h"].float()
    save_file(tensors, copy_of / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LittleBitCheckpointError, match=r"up_proj\.h: found F32"):
        AutoModelForCausalLM.from_pretrained(copy_of)
    edit_config(copy_of, lambda q: q["layer_ranks"].update({"model.layers.9.mlp.up_proj": 8}))
    with pytest.raises(LittleBitCheckpointError, match="not an nn.Linear"):
        AutoModelForCausalLM.from_pretrained(copy_of)
    edit_config(copy_of, lambda q: q.update({"layer_ranks": {}}))
    with pytest.raises(LittleBitCheckpointError, match="records no layer ranks"):
        AutoModelForCausalLM.from_pretrained(copy_of)


def test_newer_format_and_bad_config_values_are_refused(copy_of):
    edit_config(copy_of, lambda q: q.update({"format_version": 99}))
    with pytest.raises(LittleBitCheckpointError, match="upgrade hf-littlebit"):
        AutoModelForCausalLM.from_pretrained(copy_of)
    edit_config(copy_of, lambda q: q.update({"format_version": 1, "bpw": -2}))
    with pytest.raises(ValueError, match="bpw must be"):
        AutoModelForCausalLM.from_pretrained(copy_of)


def test_truncated_weights_file_does_not_load(copy_of):
    data = (copy_of / "model.safetensors").read_bytes()
    (copy_of / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type varies by version
        AutoModelForCausalLM.from_pretrained(copy_of)


def test_sharded_save_reloads(saved, tmp_path, tokens):
    model = AutoModelForCausalLM.from_pretrained(saved)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_failed_save_keeps_the_previous_folder_and_leaves_nothing_half_written(saved, tmp_path, monkeypatch, tokens):
    model = AutoModelForCausalLM.from_pretrained(saved)
    target = tmp_path / "out"
    hf_littlebit.save_pretrained(model, target)
    before = sorted(p.name for p in target.iterdir())
    assert "README.md" in before

    import transformers.modeling_utils as mu

    def broken_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mu, "safe_save_file", broken_write)
    with pytest.raises(OSError, match="disk full"):
        hf_littlebit.save_pretrained(model, target)
    with pytest.raises(OSError, match="disk full"):
        hf_littlebit.save_pretrained(model, tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == before
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert torch.equal(AutoModelForCausalLM.from_pretrained(target)(tokens).logits, model(tokens).logits)

    # plain save_pretrained failing half-way: the folder must not load as a model
    monkeypatch.setattr(mu, "safe_save_file", broken_write)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "plain")
    monkeypatch.undo()
    with pytest.raises(Exception):  # noqa: B017
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain")


def test_save_refuses_a_model_modified_after_quantization(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    model.config.quantization_config.layer_ranks["model.layers.0.mlp.up_proj"] = 64
    with pytest.raises(ValueError, match="cannot save: layer model.layers.0.mlp.up_proj has rank 8"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_without_the_plugin_transformers_loads_garbage_and_our_helper_fails_loudly(saved, fp_checkpoint, tokens):
    saved_cfg = hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("littlebit")
    saved_q = hf_auto.AUTO_QUANTIZER_MAPPING.pop("littlebit")
    try:
        silent = AutoModelForCausalLM.from_pretrained(saved)  # Transformers only warns
        assert not any(isinstance(m, hf_littlebit.LittleBitLinear) for m in silent.modules())
        model = hf_littlebit.from_pretrained(saved)  # re-registers and checks
        assert any(isinstance(m, hf_littlebit.LittleBitLinear) for m in model.modules())
    finally:
        hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["littlebit"] = saved_cfg
        hf_auto.AUTO_QUANTIZER_MAPPING["littlebit"] = saved_q
    with pytest.raises(NotALittleBitModelError, match="not a littlebit checkpoint"):
        hf_littlebit.from_pretrained(fp_checkpoint("llama"))


def test_push_to_hub_helper_uploads_the_packed_folder_and_a_card(saved, fake_hub, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved)
    hf_littlebit.push_to_hub(model, "me/tiny-littlebit")
    assert set(fake_hub.files) == {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    card = fake_hub.files["README.md"].decode()
    assert "`littlebit`" in card and "| target bpw | 0.55 |" in card and "import hf_littlebit" in card
    assert "base model" in card
    (tmp_path / "m.safetensors").write_bytes(fake_hub.files["model.safetensors"])
    uploaded = load_file(tmp_path / "m.safetensors")
    assert uploaded["model.layers.0.mlp.up_proj.u_bits"].dtype == torch.int32
    assert torch.equal(uploaded["model.layers.0.mlp.up_proj.u_bits"], model.model.layers[0].mlp.up_proj.u_bits)


def test_model_push_to_hub_uploads_the_same_files_with_littlebit_tags(saved, fake_hub):
    model = AutoModelForCausalLM.from_pretrained(saved)
    model.push_to_hub("me/tiny-littlebit")
    assert {"config.json", "model.safetensors", "README.md"} <= set(fake_hub.files)
    assert "littlebit" in fake_hub.files["README.md"].decode()
    assert json.loads(fake_hub.files["config.json"])["quantization_config"]["quant_method"] == "littlebit"
