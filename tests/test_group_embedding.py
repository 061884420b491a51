"""``whole_model=True, embedding_bits=k``: the few-bit group format (packing, quantizer), the ``GroupQuantEmbedding``
lookup and chunked tied head, the budget, save / fresh-process reload, dequantize, PEFT, trainable mode,
calibration, CLI, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitCheckpointError, LittleBitConfig, summary
from hf_littlebit.errors import BudgetTooSmallError
from hf_littlebit.format.group_quant import (
    dequantize_groups,
    group_quant_bits,
    pack_codes,
    packed_code_width,
    quantize_groups,
    unpack_codes,
)
from hf_littlebit.nn.embedding import LittleBitTiedHead
from hf_littlebit.nn.group_embedding import GroupQuantEmbedding

from .test_whole_model import ids, reload_in_fresh_process, tiny


def quantized(arch: str, **kw) -> torch.nn.Module:
    cfg = {"bpw": 4.0, "whole_model": True, "embedding_bits": 4, "embedding_group_size": 16, **kw}
    return hf_littlebit.quantize(tiny(arch), LittleBitConfig(**cfg), progress=False)


def filled(rows: int = 300, cols: int = 48, bits: int = 4, group_size: int = 16, scale: float | None = None,
           dtype: torch.dtype = torch.float32) -> tuple[GroupQuantEmbedding, torch.Tensor]:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    emb = GroupQuantEmbedding(rows, cols, bits, group_size, embed_scale=scale, output_dtype=dtype)
    emb.set_weight_(weight)
    return emb, weight


# ---------------------------------------------------------------------------------------------------- the format
@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trip_is_bit_exact(bits):
    gen = torch.Generator().manual_seed(bits)
    for cols in (1, 5, 11, 32, 64, 100, 577):
        codes = torch.randint(0, 1 << bits, (7, cols), generator=gen)
        codes[0] = (1 << bits) - 1  # every bit set, including the words' sign bits
        codes[1] = 0
        words = pack_codes(codes, bits)
        assert words.dtype == torch.int32 and words.shape == (7, packed_code_width(cols, bits))
        assert packed_code_width(cols, bits) == -(-cols * bits // 32)  # k bits per entry, padding < one word
        assert torch.equal(unpack_codes(words, cols, bits).long(), codes)


def test_packed_layout_is_one_lsb_first_bit_stream():
    assert pack_codes(torch.tensor([[5, 3]]), 3).tolist() == [[5 | 3 << 3]]
    # 3-bit code 10 occupies stream bits 30–32: the two top bits of word 0 (its sign bit) and bit 0 of word 1
    codes = torch.zeros(1, 11, dtype=torch.int64)
    codes[0, 10] = 7
    assert pack_codes(codes, 3).tolist() == [[-(2**31) + 2**30, 1]]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="expected int32 words"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 11, 3)


def test_error_falls_with_bits_and_the_search_beats_min_max():
    weight = torch.randn(512, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[::37, ::11] *= 8  # a few outliers, as real embeddings have
    errors = []
    for bits in (2, 3, 4, 8):
        codes, scales, zeros = quantize_groups(weight, bits, 32)
        assert codes.shape == weight.shape and scales.shape == zeros.shape == (512, 3)
        assert scales.dtype == zeros.dtype == torch.float16
        errors.append(((dequantize_groups(codes, scales, zeros, 32) - weight).norm() / weight.norm()).item())
        # plain min–max asymmetric quantization, for comparison
        g = weight.view(512, 3, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = ((hi - lo) / ((1 << bits) - 1)).half().float()
        lo = lo.half().float()
        minmax = lo + step * ((g - lo) / step).round().clamp(0, (1 << bits) - 1)
        assert errors[-1] < ((minmax - g).norm() / weight.norm()).item()
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01, errors
    # deterministic
    assert all(torch.equal(a, b) for a, b in zip(quantize_groups(weight, 3, 32), quantize_groups(weight, 3, 32),
                                                 strict=True))


def test_ragged_last_group_and_constant_groups():
    weight = torch.randn(20, 50)
    weight[3] = 0.25  # one value per group: reconstructed exactly
    codes, scales, zeros = quantize_groups(weight, 2, 16)  # groups of 16, 16, 16 and 2
    assert scales.shape == (20, 4)
    dense = dequantize_groups(codes, scales, zeros, 16)
    assert torch.equal(dense[3], weight[3])
    assert ((dense - weight).norm() / weight.norm()) < 0.4


# ---------------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("bits, group_size, scale", [(4, 16, None), (3, 20, 8.0), (2, 48, None)])
def test_lookup_equals_rows_of_the_dequantized_matrix(bits, group_size, scale):
    emb, weight = filled(bits=bits, group_size=group_size, scale=scale)
    dense = emb.dequantize_weight()
    assert dense.shape == weight.shape and ((dense - weight).norm() / weight.norm()) < 0.4
    tokens = torch.tensor([[0, 299, 5, 5], [17, 128, 1, 250]])
    assert torch.equal(emb(tokens), dense[tokens] * (scale or 1.0))
    assert emb.stored_bits() == group_quant_bits(300, 48, bits, group_size) == sum(
        t.numel() * (32 if t.dtype == torch.int32 else 16) for t in (emb.codes, emb.scales, emb.zeros))
    with pytest.raises(IndexError):
        emb(torch.tensor([300]))
    with pytest.raises(TypeError, match="token ids"):
        emb(torch.randn(2, 48))


def test_lookup_decodes_only_the_requested_rows(monkeypatch):
    emb, _ = filled(rows=1000)
    import hf_littlebit.nn.group_embedding as mod

    rows = []
    real = mod.unpack_codes
    monkeypatch.setattr(mod, "unpack_codes", lambda words, *a: rows.append(words.shape[0]) or real(words, *a))
    emb(torch.tensor([3, 7, 3]))
    assert rows == [3]


def test_tied_head_is_x_times_the_dequantized_transpose_in_bounded_chunks(monkeypatch):
    emb, _ = filled(rows=300)
    emb.head_chunk_elements = 48 * 64  # 64 vocab rows at a time: 5 chunks
    import hf_littlebit.nn.group_embedding as mod

    rows = []
    real = mod.unpack_codes
    monkeypatch.setattr(mod, "unpack_codes", lambda words, *a: rows.append(words.shape[0]) or real(words, *a))
    dense = emb.dequantize_weight()
    rows.clear()
    x = torch.randn(2, 3, 48, requires_grad=True)
    logits = emb.logits(x)
    assert rows and max(rows) <= 64 and sum(rows) == 300
    torch.testing.assert_close(logits, x @ dense.T, rtol=1e-5, atol=1e-5)
    # the gradient reaches x (adapters, the end-to-end phase), decoding the chunks again
    upstream = torch.randn(2, 3, 300)
    (logits * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream @ dense, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(LittleBitTiedHead(emb)(x), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_tuned_scales_get_the_gradients_of_the_dense_computation():
    """The end-to-end phase's mode: scales and zeros fp32 and trainable, codes fixed; lookup and the chunked head
    give them the gradients that autograd gives the same computation on the dequantized matrix."""
    emb, _ = filled(rows=300, group_size=20)  # 48 columns: a ragged last group
    emb.head_chunk_elements = 48 * 64
    codes = unpack_codes(emb.codes, 48, emb.bits)
    scales = emb.scales.detach().float().requires_grad_(True)
    zeros = emb.zeros.detach().float().requires_grad_(True)
    x = torch.randn(5, 48, requires_grad=True)
    tokens, upstream = torch.tensor([4, 299, 4, 0]), torch.randn(5, 300)
    dense = dequantize_groups(codes, scales, zeros, 20)
    ((x @ dense.T * upstream).sum() + dense[tokens].pow(2).sum()).backward()

    emb.tune_scales_()
    assert emb.scales_tuned and emb.scales.dtype == torch.float32 and not emb.codes.requires_grad
    x2 = x.detach().clone().requires_grad_(True)
    ((emb.logits(x2) * upstream).sum() + emb(tokens).pow(2).sum()).backward()
    for mine, ref in ((emb.scales.grad, scales.grad), (emb.zeros.grad, zeros.grad), (x2.grad, x.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # few tokens without gradient: the tuned fp32 scales, not the CPU kernel's fp16 view
        torch.testing.assert_close(emb.logits(x[:1]), x[:1] @ dense.T, rtol=1e-5, atol=1e-5)
        emb.scales.mul_(1.5)
    emb.freeze_scales_()
    assert not emb.scales_tuned and emb.scales.dtype == emb.zeros.dtype == torch.float16
    torch.testing.assert_close(emb.scales.float(), (scales * 1.5).detach().half().float())


def test_dtype_follows_the_model():
    emb, _ = filled(dtype=torch.bfloat16)
    assert emb(torch.tensor([1])).dtype == torch.bfloat16
    assert next(iter(emb.parameters())).dtype == torch.bfloat16  # Transformers reads a model's dtype from this
    assert emb.float()(torch.tensor([1])).dtype == torch.float32
    assert emb.logits(torch.randn(2, 48, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- in a model
@pytest.mark.parametrize("arch", ["llama_tied", "qwen2", "gemma3"])
def test_fresh_process_reload_is_identical(arch, tmp_path):
    model = quantized(arch)
    emb = model.model.embed_tokens
    assert isinstance(emb, GroupQuantEmbedding) and (emb.bits, emb.group_size) == (4, 16)
    cfg = model.config.quantization_config
    assert cfg.group_embedding == "model.embed_tokens" and "model.embed_tokens" not in cfg.layer_ranks
    if arch == "gemma3":
        assert emb.embed_scale == pytest.approx(64 ** 0.5)
    kinds, reloaded_state = reload_in_fresh_process(model, tmp_path)
    assert kinds["embedding"] == "GroupQuantEmbedding"
    assert kinds["head"] == ("LittleBitLinear" if arch == "qwen2" else "LittleBitTiedHead")
    state = model.state_dict()
    assert set(reloaded_state) == set(state) and not any(k.startswith("lm_head.") and arch != "qwen2"
                                                         for k in state)


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    quantized("llama_tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["embedding_group_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LittleBitCheckpointError, match="model.embed_tokens.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("allocation, bpw, floor", [("auto", 3.0, 0.9), ("uniform", 3.0, 0.8), ("auto", 5.0, 0.9)])
def test_budget_charges_the_embedding_at_its_true_bits(allocation, bpw, floor):
    model = quantized("llama_tied", bpw=bpw, allocation=allocation)
    report = summary(model)
    assert bpw * floor <= report.bpw_whole_model <= bpw
    row = next(r for r in report.layers if r.kind != "linear")
    assert row.kind == "embedding+head" and row.format == "4-bit g16" and row.rank == 0
    assert row.bytes * 8 == group_quant_bits(256, 64, 4, 16) == model.model.embed_tokens.stored_bits()
    assert "[embedding+head, 4-bit g16]" in str(report)
    assert not report.unconverted  # the codes are not "dense weights left behind"
    assert "embedding (4-bit g16 group codes) and LM head are packed too" in hf_littlebit.model_card(model)
    # the rest of the budget went to the linears: more bits for them than with a 2-bit embedding is impossible
    two_bit = summary(quantized("llama_tied", bpw=bpw, allocation=allocation, embedding_bits=2))
    linear_bits = [sum(r.bpw_true * r.in_features * r.out_features for r in rep.layers if r.kind == "linear")
                   for rep in (report, two_bit)]
    assert linear_bits[0] <= linear_bits[1]


def test_budget_too_small_for_the_embedding_alone():
    with pytest.raises(BudgetTooSmallError, match="8-bit embedding"):
        quantized("llama_tied", bpw=1.0, embedding_bits=8)


def test_dequantize_restores_the_tie_and_the_scale():
    for arch in ("llama_tied", "gemma3"):
        model = quantized(arch)
        tokens = ids()
        before = model(tokens).logits
        expected = model.model.embed_tokens.dequantize_weight()
        model.dequantize()
        assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
        assert torch.equal(model.model.embed_tokens.weight, expected)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.allclose(model(tokens).logits, before, rtol=1e-4, atol=1e-4)


def test_lora_leaves_the_group_embedding_frozen():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(quantized("llama_tied"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tokens = ids()
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # lora_A's: 0 while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # through the chunked tied head
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "embed_tokens" in n)


@pytest.mark.parametrize("arch", ["llama_tied", "qwen2"])
def test_trainable_mode_tunes_the_group_embedding_scales_and_saves_them_in_storage_dtype(tmp_path, arch):
    """QAT (make_trainable): scales and zeros fp32 and trainable, codes fixed, gradients through the lookup (and the
    chunked tied head); a save while training writes them fp16, as a packed save would; after an optimiser step
    the packed model, the saved-while-training folder and its fresh reload agree."""
    model = quantized(arch)
    tokens = ids()
    before = model(tokens).logits
    hf_littlebit.make_trainable(model, estimator="ste")
    emb = model.model.embed_tokens
    assert emb.scales_tuned and {n for n, p in emb.named_parameters() if p.requires_grad} == {"scales", "zeros"}
    assert emb.scales.dtype == torch.float32 and not emb.codes.requires_grad
    assert torch.allclose(model(tokens).logits, before, rtol=1e-5, atol=1e-5)  # fp16 → fp32 is exact
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert emb.scales.grad is not None and emb.scales.grad.abs().sum() > 0 and emb.zeros.grad.abs().sum() > 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.Adam(trainable, lr=1e-2).step()
    model.eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.scales").get_dtype() == "F16"
    hf_littlebit.pack(model)
    assert not emb.scales_tuned and emb.scales.dtype == torch.float16 and not emb.scales.requires_grad
    after = model(tokens).logits
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(tokens).logits, after)


def test_qat_with_the_trainer_tunes_the_group_embedding_scales(tmp_path):
    """The user's QAT path on a whole-model checkpoint: reload with ``trainable=True``, distil from the fp model with
    ``LittleBitTrainer``; the embedding's scales and zeros move (its codes do not), the model is packed at the end
    and its save reloads to the same logits. ``embedding_scales=False`` keeps them frozen."""
    import copy

    from transformers import TrainingArguments

    fp = tiny("qwen2")
    teacher = copy.deepcopy(fp)
    model = hf_littlebit.quantize(fp, LittleBitConfig(bpw=4.0, whole_model=True, embedding_bits=4,
                                                      embedding_group_size=16), progress=False)
    model.save_pretrained(tmp_path / "q")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=LittleBitConfig(
        trainable=True, sign_estimator="ste"))
    emb = student.model.embed_tokens
    assert emb.scales_tuned and emb.scales.requires_grad and not emb.codes.requires_grad
    scales, zeros, codes = emb.scales.detach().clone(), emb.zeros.detach().clone(), emb.codes.clone()
    rows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_steps=3,
                             learning_rate=1e-2)
    hf_littlebit.LittleBitTrainer(model=student, args=args, teacher=teacher,
                                  train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    assert not emb.scales_tuned and emb.scales.dtype == torch.float16  # packed at the end
    assert torch.equal(emb.codes, codes)
    assert not torch.equal(emb.scales.float(), scales) and not torch.equal(emb.zeros.float(), zeros)
    student.save_pretrained(tmp_path / "tuned")
    tokens = ids()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")(tokens).logits,
                       student(tokens).logits)

    hf_littlebit.make_trainable(student, estimator="ste", embedding_scales=False)
    assert not emb.scales_tuned and not any(p.requires_grad for p in emb.parameters())

    # frozen by someone else (PEFT does this) the scales stay tuned fp32: a save still writes them fp16
    hf_littlebit.make_trainable(student, estimator="ste")
    student.requires_grad_(False)
    assert emb.scales_tuned and emb.scales.dtype == torch.float32
    student.save_pretrained(tmp_path / "frozen")
    with safe_open(str(tmp_path / "frozen" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.zeros").get_dtype() == "F16"
    hf_littlebit.make_trainable(student, estimator="ste")  # ... and make_trainable turns them back on
    assert emb.scales.requires_grad and emb.zeros.requires_grad


@pytest.mark.parametrize("arch", ["llama_tied", "qwen2"])
def test_calibration_end_to_end_keeps_the_fp_teacher_and_tunes_the_embedding_scales(monkeypatch, arch):
    import copy

    from hf_littlebit.quantize.reconstruct import end_to_end

    fp = tiny(arch)
    reference = copy.deepcopy(fp)
    seen = []
    real = end_to_end._student_and_teacher_logits

    def spy(model, hook, batch, teacher):
        student, teacher_logits = real(model, hook, batch, teacher)
        seen.append((batch, teacher_logits))
        return student, teacher_logits

    monkeypatch.setattr(end_to_end, "_student_and_teacher_logits", spy)
    cfg = LittleBitConfig(bpw=4.0, whole_model=True, embedding_bits=3, embedding_group_size=32,
                          calibration_samples=4, calibration_seqlen=16, calibration_steps=2,
                          calibration_batch_size=2, calibration_e2e_steps=2)
    model = hf_littlebit.quantize(fp, cfg, calibration=torch.randint(0, 128, (4, 16)), progress=False)
    assert seen
    with torch.no_grad():
        for batch, teacher_logits in seen:
            assert torch.allclose(teacher_logits, reference(batch).logits, rtol=1e-4, atol=1e-4)
    emb = model.model.embed_tokens
    assert isinstance(emb, GroupQuantEmbedding) and not any(p.requires_grad for p in emb.parameters())
    direct = GroupQuantEmbedding.like(reference.model.embed_tokens, 3, 32)
    direct.set_weight_(reference.model.embed_tokens.weight)
    assert torch.equal(emb.codes, direct.codes)  # the codes are fixed ...
    for name in ("scales", "zeros"):  # ... the scales and zeros tuned, and back in their storage dtype
        assert getattr(emb, name).dtype == torch.float16 and not torch.equal(getattr(emb, name), getattr(direct, name))
    assert torch.isfinite(model(ids()).logits).all()


def test_cli_json_reports_the_embedding_format(capsys, fp_checkpoint, tmp_path):
    from hf_littlebit.cli.main import main

    code = main(["--quiet", "quantize", fp_checkpoint("gemma3"), "--bpw", "4", "--whole-model", "--no-calibrate",
                 "--embedding-bits", "4", "--embedding-group-size", "32", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["embedding_format"] == "4-bit g32" and result["embedding_bits"] == 4
    assert result["bpw_embedding"] == pytest.approx(group_quant_bits(128, 64, 4, 32) / (128 * 64))
    assert result["bpw_whole_model"] <= 4.0 and result["bpw_checkpoint"] < 6.0 and Path(result["out"]).is_dir()
    assert main(["quantize", fp_checkpoint("gemma3"), "--embedding-bits", "4", "--no-calibrate"]) == 2
    assert "whole_model=True" in capsys.readouterr().err


def test_config_round_trip_and_bad_values():
    cfg = LittleBitConfig(whole_model=True, embedding_bits=3, embedding_group_size=128,
                          group_embedding="model.embed_tokens", tied_heads={"lm_head": "model.embed_tokens"})
    again = LittleBitConfig.from_dict(json.loads(cfg.to_json_string()))
    assert (again.embedding_bits, again.embedding_group_size, again.group_embedding) == (3, 128,
                                                                                         "model.embed_tokens")
    assert LittleBitConfig(whole_model=True).embedding_bits is None  # binary low-rank stays the default
    for bits in (1, 9, 16, "4", 4.0, True):
        with pytest.raises(ValueError, match="embedding_bits must be None"):
            LittleBitConfig(whole_model=True, embedding_bits=bits)
    with pytest.raises(ValueError, match="set whole_model=True"):
        LittleBitConfig(embedding_bits=4)
    for size in (0, -64, 64.0, None):
        with pytest.raises(ValueError, match="embedding_group_size must be a positive integer"):
            LittleBitConfig(whole_model=True, embedding_bits=4, embedding_group_size=size)
    with pytest.raises(ValueError, match="group_embedding"):
        LittleBitConfig(whole_model=True, group_embedding="model.embed_tokens")
