"""``whole_model=True``: packed embedding lookup, tied head stored once, whole-model budget, save / fresh-process
reload, dequantize, PEFT on the remaining layers, calibration with the fp head as teacher, CLI, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitQuantizationError, summary
from hf_littlebit.errors import BudgetTooSmallError
from hf_littlebit.factorize import factorize
from hf_littlebit.nn.embedding import LittleBitEmbedding, LittleBitTiedHead

from .conftest import make_tiny_model

TIED_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def tiny(arch: str) -> torch.nn.Module:
    if arch == "llama_tied":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TIED_LLAMA))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return model.eval()
    return make_tiny_model(arch)


def ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def quantized(arch: str, **kw) -> torch.nn.Module:
    return hf_littlebit.quantize(tiny(arch), LittleBitConfig(**{"bpw": 4.0, "whole_model": True, **kw}),
                                 progress=False)


# ---------------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("residual, scale", [(True, None), (False, 8.0)])
def test_lookup_equals_rows_of_the_reconstruction(residual, scale):
    torch.manual_seed(0)
    weight = torch.randn(300, 48)
    emb = LittleBitEmbedding(300, 48, rank=24, residual=residual, embed_scale=scale)
    emb.set_factors_(factorize(weight, 24, residual=residual))
    tokens = torch.tensor([[0, 299, 5, 5], [17, 128, 1, 250]])
    dense = emb.dequantize_weight(torch.float32)
    expected = dense[tokens] * (scale or 1.0)
    assert torch.allclose(emb(tokens), expected, rtol=1e-5, atol=1e-5)
    # the head over the same tensors is x Êᵀ, whatever backend runs it
    x = torch.randn(3, 48)
    for backend in ("torch", "auto"):
        emb.backend = backend
        assert torch.allclose(emb.logits(x), x @ dense.T, rtol=1e-4, atol=1e-4)
    # trainable mode (QAT / end-to-end) looks up the same rows, differentiably in the scales
    emb.make_trainable_(estimator="ste")
    rows = emb(tokens)
    assert torch.allclose(rows, expected, rtol=1e-5, atol=1e-5)
    rows.sum().backward()
    assert emb.h.grad is not None and emb.g.grad is not None
    with pytest.raises(IndexError):
        emb(torch.tensor([300]))


def test_lookup_never_unpacks_the_whole_sign_matrix(monkeypatch):
    emb = LittleBitEmbedding(1000, 32, rank=8, residual=False)
    emb.set_factors_(factorize(torch.randn(1000, 32), 8, residual=False))
    import hf_littlebit.nn.embedding as mod

    shapes = []
    real = mod.unpack_signs

    def spy(packed, cols, dtype=torch.float32):
        shapes.append(tuple(packed.shape))
        return real(packed, cols, dtype)

    monkeypatch.setattr(mod, "unpack_signs", spy)
    emb(torch.tensor([3, 7, 3]))
    assert all(rows <= 8 for rows, _ in shapes), shapes  # 3 gathered rows of U and the 8 × 32 V; never 1000 rows


def test_dtype_follows_the_model():
    emb = LittleBitEmbedding(64, 32, rank=8, output_dtype=torch.bfloat16)
    emb.set_factors_(factorize(torch.randn(64, 32), 8))
    assert emb(torch.tensor([1])).dtype == torch.bfloat16
    assert emb.float()(torch.tensor([1])).dtype == torch.float32
    assert next(iter(emb.parameters())).dtype == torch.float32  # Transformers reads a model's dtype from this


def available_backends() -> list[str]:
    from hf_littlebit.backends.cpu import cpu_kernel_available
    from hf_littlebit.backends.triton import interpreter_enabled, triton_available

    return (["cpu"] if cpu_kernel_available() else []) + (["triton"] if triton_available() and
                                                          interpreter_enabled() else [])


@pytest.mark.parametrize("backend", available_backends())
def test_tied_head_runs_on_the_packed_backends(backend, monkeypatch):
    """The tied head and the packed linears give the PyTorch reference's logits through the CPU kernel and Triton
    (interpreter on CPU tensors here); the embedding lookup is plain tensor code on any device."""
    monkeypatch.delenv("LITTLEBIT_BACKEND", raising=False)
    model = quantized("llama_tied")
    with torch.no_grad():
        hf_littlebit.set_backend(model, "torch")
        reference = model(ids()).logits
        assert hf_littlebit.set_backend(model, backend) == 15  # 14 linears and the embedding (the head's tensors)
        torch.testing.assert_close(model(ids()).logits, reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- conversion
def test_tied_model_stores_one_copy_and_untied_head_is_a_packed_linear(tmp_path):
    model = quantized("llama_tied")
    assert isinstance(model.model.embed_tokens, LittleBitEmbedding)
    assert isinstance(model.lm_head, LittleBitTiedHead) and model.lm_head.embedding is model.model.embed_tokens
    cfg = model.config.quantization_config
    assert cfg.tied_heads == {"lm_head": "model.embed_tokens"} and "model.embed_tokens" in cfg.layer_ranks
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    assert model.all_tied_weights_keys == {}
    x = torch.randn(1, 3, 64)
    assert torch.equal(model.lm_head(x), model.model.embed_tokens.logits(x))
    assert model.generate(ids(), max_new_tokens=3, do_sample=False).shape == (2, 15)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("lm_head") for k in keys)
    assert {"model.embed_tokens.u_bits", "model.embed_tokens.res_v_bits"} <= keys
    assert not any(k.endswith(".weight") and ("embed" in k or "proj" in k) for k in keys)  # nothing dense left

    untied = quantized("qwen2")
    assert type(untied.lm_head).__name__ == "LittleBitLinear"
    assert isinstance(untied.model.embed_tokens, LittleBitEmbedding)
    assert untied.config.quantization_config.tied_heads == {}
    assert "lm_head" in untied.config.quantization_config.layer_ranks


RELOAD = """
import json, sys, torch, hf_littlebit
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_warning()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.load(sys.argv[2])
torch.save({"logits": model(ids).logits, "state": model.state_dict()}, sys.argv[3])
print(json.dumps({"head": type(model.lm_head).__name__, "embedding": type(model.get_input_embeddings()).__name__}))
"""


def reload_in_fresh_process(model, tmp_path: Path) -> tuple[dict, dict]:  # noqa: ANN001 - any causal LM
    """Save ``model``, reload it with plain ``from_pretrained`` in a fresh process (no load warnings allowed), check
    that its logits on :func:`ids` are identical and that every tensor it shares with ``model`` is bit-identical;
    returns the reloaded embedding/head class names and the reloaded state dict."""
    tokens = ids()
    logits = model(tokens).logits
    model.save_pretrained(tmp_path / "q")
    torch.save(tokens, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for word in ("load report", "missing", "unexpected", "mismatch", "newly initialized", "not used"):
        assert word not in out.stderr.lower(), out.stderr[-3000:]
    reloaded = torch.load(tmp_path / "out.pt")
    assert torch.equal(reloaded["logits"], logits)
    for key, value in model.state_dict().items():
        assert value.dtype == reloaded["state"][key].dtype and torch.equal(value, reloaded["state"][key]), key
    return json.loads(out.stdout.strip().splitlines()[-1]), reloaded["state"]


@pytest.mark.parametrize("arch", ["llama_tied", "qwen2", "gemma3"])
def test_fresh_process_reload_is_identical(arch, tmp_path):
    model = quantized(arch)
    kinds, state = reload_in_fresh_process(model, tmp_path)
    assert kinds["embedding"] == "LittleBitEmbedding"
    assert kinds["head"] == ("LittleBitLinear" if arch == "qwen2" else "LittleBitTiedHead")
    assert set(state) == set(model.state_dict())


# ---------------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("allocation, bpw, floor", [("auto", 2.0, 0.95), ("auto", 3.0, 0.95),
                                                    ("uniform", 2.0, 0.85), ("uniform", 3.0, 0.85)])
def test_whole_model_bpw_is_within_a_few_percent_of_the_target(allocation, bpw, floor):
    """The budget is never exceeded (norms, biases and buffers count as stored). On 64-wide layers one rank step of
    8 is ~20 % of a layer's bits, so one common rate (uniform) lands further below the target than the allocator."""
    model = quantized("llama_tied", bpw=bpw, allocation=allocation)
    report = summary(model)
    assert bpw * floor <= report.bpw_whole_model <= bpw
    assert report.model_params == sum(p.numel() for p in tiny("llama_tied").parameters())


def test_allocators_count_the_embedding():
    fp = tiny("llama_tied")
    emb_params = fp.model.embed_tokens.weight.numel()
    auto = quantized("llama_tied", bpw=3.0, allocation="auto")
    ranks = auto.config.quantization_config.layer_ranks
    assert "model.embed_tokens" in ranks and "lm_head" not in ranks
    # uniform: the embedding gets the common rate, within the rank grid of its shape
    uniform = summary(quantized("llama_tied", bpw=3.0))
    emb_report = next(r for r in uniform.layers if r.name == "model.embed_tokens")
    linear_rates = [r.bpw_true for r in uniform.layers if r.name != "model.embed_tokens"]
    assert min(linear_rates) * 0.75 <= emb_report.bpw_true <= max(linear_rates) * 1.25
    assert emb_report.kind == "embedding+head" and emb_report.in_features * emb_report.out_features == emb_params
    # linears only: the same bpw target gives a much larger model (the embedding stays dense)
    linears_only = summary(hf_littlebit.quantize(tiny("llama_tied"), LittleBitConfig(bpw=3.0), progress=False))
    assert linears_only.bpw_whole_model > 2 * uniform.bpw_whole_model


# ---------------------------------------------------------------------------------------------------- other paths
def test_dequantize_restores_a_tied_dense_model():
    model = quantized("llama_tied")
    tokens = ids()
    before = model(tokens).logits
    model.dequantize()
    assert type(model.model.embed_tokens) is not LittleBitEmbedding
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.all_tied_weights_keys
    assert torch.allclose(model(tokens).logits, before, rtol=1e-3, atol=1e-3)


def test_dequantize_keeps_gemma_scaled_embedding():
    model = quantized("gemma3")
    tokens = ids()
    before = model(tokens).logits
    model.dequantize()
    assert torch.allclose(model(tokens).logits, before, rtol=1e-3, atol=1e-3)


def test_lora_on_the_remaining_layers_trains():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(quantized("llama_tied"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tokens = ids()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)


def test_trainable_mode_trains_the_packed_embedding_scales_only_and_packs_back(tmp_path):
    """QAT's make_trainable: the packed embedding (and so the tied head) goes to trainable mode with its ±1 latents
    frozen, like a dense embedding in LittleBit's recipe, but its scale vectors train (``embedding_scales=False``
    freezes them too); a step moves the logits, saving while trainable writes the packed format, and the reload
    gives the packed model's logits."""
    model = quantized("llama_tied")
    tokens = ids()
    before = model(tokens).logits
    hf_littlebit.make_trainable(model, estimator="ste")
    emb = model.model.embed_tokens
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert emb.is_trainable and trainable == {p + n for p in emb.path_prefixes for n in ("h", "l", "g")}
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(emb.get_parameter(n).grad is not None and emb.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    model.save_pretrained(tmp_path / "untouched")
    hf_littlebit.pack(model)
    assert emb.is_packed and torch.allclose(model(tokens).logits, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "untouched")(tokens).logits,
                       model(tokens).logits)

    hf_littlebit.make_trainable(model, estimator="ste")
    optimizer = torch.optim.Adam([emb.get_parameter(n) for n in trainable], lr=1e-2)
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "stepped")
    hf_littlebit.pack(model)
    after = model(tokens).logits
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "stepped")(tokens).logits, after)

    hf_littlebit.make_trainable(model, estimator="ste", embedding_scales=False)
    assert emb.is_trainable and not any(p.requires_grad for p in emb.parameters())
    hf_littlebit.make_trainable(model, estimator="ste")  # already trainable: the scales are switched back on
    assert {n for n, p in emb.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("arch, head", [("llama_tied", LittleBitTiedHead), ("qwen2", hf_littlebit.LittleBitLinear)])
def test_calibration_end_to_end_teacher_is_the_fp_model(monkeypatch, arch, head):
    """The end-to-end phase tunes the packed embedding and head too, while the teacher's logits are exactly the fp
    model's (fp last-block states through the fp head, not the packed one)."""
    import copy

    from hf_littlebit.quantize.reconstruct import end_to_end

    fp = tiny(arch)
    reference = copy.deepcopy(fp)
    seen = []
    real = end_to_end._student_and_teacher_logits

    def spy(model, hook, batch, teacher):
        student, teacher_logits = real(model, hook, batch, teacher)
        seen.append((type(model.lm_head.head).__name__, batch, teacher_logits))
        return student, teacher_logits

    monkeypatch.setattr(end_to_end, "_student_and_teacher_logits", spy)
    cfg = LittleBitConfig(bpw=4.0, whole_model=True, calibration_samples=4, calibration_seqlen=16,
                          calibration_steps=2, calibration_batch_size=2, calibration_e2e_steps=2)
    model = hf_littlebit.quantize(fp, cfg, calibration=torch.randint(0, 128, (4, 16)), progress=False)
    assert seen and all(kind == head.__name__ for kind, _, _ in seen)
    with torch.no_grad():
        for _, batch, teacher_logits in seen:
            assert torch.allclose(teacher_logits, reference(batch).logits, rtol=1e-4, atol=1e-4)
    assert type(model.lm_head) is head and isinstance(model.model.embed_tokens, LittleBitEmbedding)
    assert not model.model.embed_tokens.is_trainable and model.model.embed_tokens.is_packed
    assert "model.embed_tokens" in model.hf_quantizer.reconstruction.outside_blocks
    assert torch.isfinite(model(ids()).logits).all()


def test_from_pretrained_with_whole_model(fp_checkpoint, tokens):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("gemma3"),
                                                 quantization_config=LittleBitConfig(bpw=4.0, whole_model=True))
    assert isinstance(model.model.embed_tokens, LittleBitEmbedding) and isinstance(model.lm_head, LittleBitTiedHead)
    assert torch.isfinite(model(tokens).logits).all()


def test_push_to_hub_uploads_one_copy_of_the_tied_factors_and_the_upload_reloads(fake_hub, tmp_path):
    model = quantized("llama_tied")
    tokens = ids()
    logits = model(tokens).logits
    hf_littlebit.push_to_hub(model, "me/tiny-whole")
    folder = tmp_path / "download"
    for name, data in fake_hub.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118 - safe_open has keys(), no iteration protocol
    assert any(k.startswith("model.embed_tokens.") for k in keys)
    assert not any(k.startswith("lm_head.") for k in keys)  # the tied head is the embedding's factors, stored once
    assert "whole-model" in fake_hub.files["README.md"].decode()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.get_input_embeddings(), LittleBitEmbedding)
    assert isinstance(reloaded.get_output_embeddings(), LittleBitTiedHead)
    assert torch.equal(reloaded(tokens).logits, logits)


def test_model_card_says_which_bpw_it_is():
    card = hf_littlebit.model_card(quantized("llama_tied"))
    assert "whole-model" in card and "4.0 (whole model)" in card and "LM head are packed too" in card


def test_config_round_trip_and_bad_values():
    cfg = LittleBitConfig(whole_model=True, layer_ranks={"model.embed_tokens": 8},
                          tied_heads={"lm_head": "model.embed_tokens"})
    again = LittleBitConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.whole_model and again.tied_heads == {"lm_head": "model.embed_tokens"}
    with pytest.raises(ValueError, match="whole_model"):
        LittleBitConfig(whole_model="yes")
    with pytest.raises(ValueError, match="tied_heads"):
        LittleBitConfig(layer_ranks={"e": 8}, tied_heads={"lm_head": "e"})
    with pytest.raises(ValueError, match="tied_heads"):
        LittleBitConfig(whole_model=True, tied_heads={"lm_head": "not_converted"})


def test_clear_errors_for_models_without_embedding_and_too_small_budgets(monkeypatch):
    model = tiny("qwen2")
    monkeypatch.setattr(type(model), "get_input_embeddings", lambda self: None)
    with pytest.raises(LittleBitQuantizationError, match="no nn.Embedding input embedding"):
        hf_littlebit.quantize(model, LittleBitConfig(bpw=4.0, whole_model=True), progress=False)
    monkeypatch.undo()
    with pytest.raises(LittleBitQuantizationError, match="tied to the embedding"):
        hf_littlebit.quantize(tiny("llama_tied"), LittleBitConfig(bpw=4.0, whole_model=True,
                                                                  modules_to_not_convert=["lm_head"]), progress=False)
    # both left dense on purpose: the whole-model budget pays for the fp32 embedding first, the tie is kept
    kept = hf_littlebit.quantize(tiny("llama_tied"), LittleBitConfig(
        bpw=8.0, whole_model=True, modules_to_not_convert=["lm_head", "model.embed_tokens"]), progress=False)
    assert kept.lm_head.weight is kept.model.embed_tokens.weight and summary(kept).bpw_whole_model <= 8.0
    with pytest.raises(BudgetTooSmallError, match="whole_model"):
        hf_littlebit.quantize(tiny("qwen2"), LittleBitConfig(bpw=0.3, whole_model=True), progress=False)


def test_cli_whole_model_json(capsys, fp_checkpoint, tmp_path):
    from hf_littlebit.cli.main import main

    code = main(["--quiet", "quantize", fp_checkpoint("gemma3"), "--bpw", "4", "--whole-model", "--no-calibrate",
                 "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["whole_model"] is True
    assert result["bpw_whole_model"] <= 4.0
    # the safetensors header (~100 bytes a tensor) is a large share of a 100 k-parameter model; not of a real one
    assert result["bpw_checkpoint"] < 6.0
    assert result["bpw_true"] > 0 and Path(result["out"]).is_dir()
