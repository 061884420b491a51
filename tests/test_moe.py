"""Mixture-of-experts models (issue 21): fused experts are packed one layer per expert, in five families.

Every test builds tiny random models from configs (hidden 64, 4 experts, 2 layers). The reference for the packed
model is the *dense* model whose weights — the fused expert tensors included — are replaced by the packed layers'
reconstructions Ŵ, run by Transformers' own experts implementation (so routing, gates, activations and biases are
the architecture's, not ours).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen3MoeConfig,
)

import hf_littlebit
from hf_littlebit import LittleBitConfig, LittleBitLinear
from hf_littlebit.errors import LittleBitQuantizationError
from hf_littlebit.nn.experts import FUSED_TO_LIST, LittleBitExperts, is_fused_experts
from hf_littlebit.nn.layer import littlebit_layers

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
MOE_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**BASE, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, head_dim=16),
    "mixtral": lambda: MixtralConfig(**BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    # transposed fused weights, per-expert biases, clamped interleaved SwiGLU
    "gpt_oss": lambda: GptOssConfig(**BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=16, sliding_window=16, swiglu_limit=0.5),
    # first layer dense, then shared + routed experts
    "deepseek_v3": lambda: DeepseekV3Config(
        **BASE, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "olmoe": lambda: OlmoeConfig(**BASE, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
}
FAMILIES = list(MOE_CONFIGS)


def make_moe(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MOE_CONFIGS[family]())
    with torch.no_grad():  # random init leaves routers / biases at zero: perturb so routing and biases matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    cache: dict[str, str] = {}

    def build(family: str) -> str:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"moe_{family}")
            make_moe(family).save_pretrained(path)
            cache[family] = str(path)
        return cache[family]

    return build


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def dense_with_reconstructions(fp: nn.Module, packed: nn.Module) -> nn.Module:
    """``fp`` (unsplit, the architecture's own experts modules) with every weight the packed model converted
    replaced by its reconstruction Ŵ."""
    layers = {name: m for name, m in packed.named_modules() if isinstance(m, LittleBitLinear)}
    with torch.no_grad():
        for name, module in fp.named_modules():
            if name in layers:
                module.weight.copy_(layers[name].dequantize_weight())
            elif is_fused_experts(module):
                split = packed.get_submodule(name)
                assert isinstance(split, LittleBitExperts)
                for fused_name, expert_layers in split.expert_lists().items():
                    w = torch.stack([layer.dequantize_weight() for layer in expert_layers])
                    getattr(module, fused_name).copy_(w.transpose(1, 2) if module.is_transposed else w)
    return fp


def expert_and_linear_weights(fp: nn.Module, skip: list[str]) -> int:
    """Parameters of every fused expert tensor and every nn.Linear weight outside ``skip`` (the LM head)."""
    total = 0
    for name, module in fp.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif is_fused_experts(module):
            total += sum(getattr(module, n).numel() for n in FUSED_TO_LIST if n in module._parameters)
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_equals_the_dense_model_with_reconstructed_experts(family, moe_checkpoint, ids):
    path = moe_checkpoint(family)
    packed = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0))
    experts = [m for m in packed.modules() if isinstance(m, LittleBitExperts)]
    assert experts and all(not any(n in m._parameters for n in FUSED_TO_LIST) for m in experts)
    assert all(isinstance(layer, LittleBitLinear) and layer.is_packed
               for m in experts for layers in m.expert_lists().values() for layer in layers)
    # the routers stay dense, and are the only weights that do
    report = hf_littlebit.summary(packed)
    assert all(n.endswith(("gate.weight", "router.weight")) for n in report.unconverted), report.unconverted

    fp = AutoModelForCausalLM.from_pretrained(path).eval()
    reference = dense_with_reconstructions(fp, packed)
    torch.testing.assert_close(logits(packed, ids), logits(reference, ids), rtol=1e-4, atol=1e-5)

    # converted share of the expert + attention (+ dense MLP, shared expert) weights
    skip = packed.config.quantization_config.modules_to_not_convert
    assert report.converted_params / expert_and_linear_weights(fp, skip) >= 0.99
    assert len(report.experts) == 2 * sum(1 for m in fp.modules() if is_fused_experts(m))
    assert all(g.experts == 4 for g in report.experts)
    assert "4x" in str(report) and "of them experts" in str(report)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_fresh_process_reload_is_bit_exact(family, moe_checkpoint, ids, tmp_path):
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint(family), quantization_config=LittleBitConfig(bpw=0.8))
    expected = logits(packed, ids)
    packed.save_pretrained(tmp_path / "q")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import torch, hf_littlebit
        from transformers import AutoModelForCausalLM
        from hf_littlebit.nn.experts import LittleBitExperts
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
        assert any(isinstance(m, LittleBitExperts) for m in model.modules())
        with torch.no_grad():
            out = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_in_place_quantize_equals_quantize_on_load(family, moe_checkpoint, ids):
    path = moe_checkpoint(family)
    on_load = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0))
    in_place = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(path), LittleBitConfig(bpw=1.0),
                                     progress=False)
    assert in_place.config.quantization_config.layer_ranks == on_load.config.quantization_config.layer_ranks
    assert torch.equal(logits(in_place, ids), logits(on_load, ids))


def test_unsupported_experts_implementation_is_refused(moe_checkpoint, ids):
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("qwen3_moe"), quantization_config=LittleBitConfig())
    expected = logits(packed, ids)
    for same_math in ("eager", "batched_mm", "grouped_mm"):
        packed.config._experts_implementation = same_math
        assert torch.equal(logits(packed, ids), expected)
    packed.config._experts_implementation = "sonicmoe"
    with pytest.raises(LittleBitQuantizationError, match="sonicmoe.*no longer has"):
        logits(packed, ids)


def test_dequantize_restores_the_fused_experts_modules(moe_checkpoint, ids):
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("gpt_oss"), quantization_config=LittleBitConfig())
    expected = logits(packed, ids)
    dense = packed.dequantize()
    experts = [m for m in dense.modules() if is_fused_experts(m)]
    assert experts and not any(isinstance(m, LittleBitExperts) for m in experts)
    assert type(experts[0]).__name__ == "GptOssExperts" and experts[0].gate_up_proj.dim() == 3
    torch.testing.assert_close(logits(dense, ids), expected, rtol=1e-4, atol=1e-5)


def test_true_bpw_of_the_experts_is_within_5_percent_of_the_target_at_a_larger_shape():
    """With the model-wide budget of true bits (``allocation="auto"``), experts included. (The uniform rule follows
    the paper's accounting, which leaves out part of the scale vectors, and lands above the target.)"""
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=512, intermediate_size=256, moe_intermediate_size=768,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, head_dim=128, max_position_embeddings=64)
    model = hf_littlebit.quantize(AutoModelForCausalLM.from_config(cfg),
                                  LittleBitConfig(bpw=0.55, allocation="auto"), progress=False)
    report = hf_littlebit.summary(model)
    assert len(report.experts) == 2 and report.bpw_true <= 0.55
    assert report.bpw_true == pytest.approx(0.55, rel=0.05)
    # every expert is counted in the budget (the allocator may give attention a larger share of it)
    expert_params = sum(g.experts * g.in_features * g.out_features for g in report.experts)
    assert expert_params > 0.8 * report.converted_params


def test_global_allocator_counts_every_expert(moe_checkpoint):
    model = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(moe_checkpoint("olmoe")),
                                  LittleBitConfig(bpw=3.0, allocation="auto", min_rank=8), progress=False)
    ranks = model.config.quantization_config.layer_ranks
    experts = {n: r for n, r in ranks.items() if "_layers." in n}
    assert len(experts) == 2 * 2 * 4  # layers × projections × experts, each allocated on its own spectrum
    report = hf_littlebit.summary(model)
    assert report.bpw_true <= 3.0


def test_cpu_kernel_runs_the_hit_experts(moe_checkpoint, ids):
    from hf_littlebit.backends.cpu import cpu_kernel_available

    if not cpu_kernel_available():
        pytest.skip("the CPU kernel is not built here")
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("mixtral"), quantization_config=LittleBitConfig())
    hf_littlebit.set_backend(packed, "torch")
    expected = logits(packed, ids[:, :4])
    hf_littlebit.set_backend(packed, "cpu")
    torch.testing.assert_close(logits(packed, ids[:, :4]), expected, rtol=1e-4, atol=1e-5)


def test_triton_kernels_run_the_hit_experts_under_the_interpreter(moe_checkpoint, ids):
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
    from hf_littlebit.backends.triton import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py)")
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("qwen3_moe"), quantization_config=LittleBitConfig())
    hf_littlebit.set_backend(packed, "torch")
    expected = logits(packed, ids[:, :3])
    hf_littlebit.set_backend(packed, "triton")
    torch.testing.assert_close(logits(packed, ids[:, :3]), expected, rtol=1e-4, atol=1e-4)


def test_qat_trains_the_latent_expert_factors(moe_checkpoint, ids):
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("qwen3_moe"), quantization_config=LittleBitConfig())
    hf_littlebit.make_trainable(packed)
    experts = next(m for m in packed.modules() if isinstance(m, LittleBitExperts))
    assert all(layer.is_trainable for layer in experts.gate_up_layers)
    out = packed(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [layer.u_latent.grad for layer in experts.gate_up_layers]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    before = copy.deepcopy(packed.state_dict())
    hf_littlebit.pack(packed)
    assert all(layer.is_packed for layer in experts.gate_up_layers)
    assert before.keys() != packed.state_dict().keys()  # latents gone, packed bits back


def test_calibration_routes_tokens_and_reports_idle_experts(moe_checkpoint):
    cfg = LittleBitConfig(bpw=1.0, calibration_samples=4, calibration_seqlen=16, calibration_steps=5,
                          calibration_batch_size=2)
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    model = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(moe_checkpoint("deepseek_v3")), cfg,
                                  calibration=tokens, progress=False)
    report = model.hf_quantizer.reconstruction
    counts = report.blocks[1].expert_tokens
    assert len(counts) == 4 and report.blocks[0].expert_tokens == {}  # layer 0 is dense
    assert sum(counts.values()) == 4 * 16 * 2  # every token reaches top-2 experts
    assert report.experts_without_tokens == sum(1 for n in counts.values() if n == 0)
    assert all(layer.is_packed for layer in littlebit_layers(model).values())


def test_lora_adapters_on_attention_and_routed_expert_layers(moe_checkpoint, ids):
    """Routed experts are LittleBitLinears, so LoRA wraps them when named. Shared experts' ``gate_proj`` / ``up_proj``
    / ``down_proj`` cannot be named on these architectures: PEFT (0.19) rewrites those names into a LoRA on the fused
    ``gate_up_proj`` / ``down_proj`` parameters of the v5 experts, for fp models too. A list of names, because PEFT
    also resolves regex targets through that rewrite."""
    peft = pytest.importorskip("peft")
    packed = AutoModelForCausalLM.from_pretrained(moe_checkpoint("deepseek_v3"), quantization_config=LittleBitConfig())
    targets = ["q_a_proj", "o_proj", *(f"down_layers.{e}" for e in range(4))]
    model = peft.get_peft_model(packed, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    wrapped = [n for n, m in model.named_modules()
               if hasattr(m, "lora_A") and isinstance(m.base_layer, LittleBitLinear)]
    assert sum(".experts.down_layers." in n for n in wrapped) == 4 and sum("o_proj" in n for n in wrapped) == 2
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and "down_layers" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_experts_named_in_modules_to_not_convert_stay_fused_and_are_named(moe_checkpoint, ids, tmp_path, caplog):
    path = moe_checkpoint("qwen3_moe")
    with caplog.at_level("WARNING", logger="hf_littlebit"):
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=LittleBitConfig(modules_to_not_convert=["lm_head", "experts"]))
    assert not any(isinstance(m, LittleBitExperts) for m in model.modules())
    assert "model.layers.0.mlp.experts.gate_up_proj" not in caplog.text  # asked for: not a surprise
    ranks = model.config.quantization_config.layer_ranks
    assert ranks and not any("_layers." in n for n in ranks)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not any(isinstance(m, LittleBitExperts) for m in again.modules())
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_trainer_qat_with_distillation_trains_expert_latents_and_saves_packed(moe_checkpoint, ids, tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from hf_littlebit import LittleBitQATCallback

    path = moe_checkpoint("gpt_oss")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0, trainable=True))
    experts = next(m for m in model.modules() if isinstance(m, LittleBitExperts))
    before = [layer.u_latent.detach().clone() for layer in experts.down_layers]
    rows = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_steps=2,
                             learning_rate=1e-2)
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
            callbacks=[LittleBitQATCallback(teacher=teacher, pack_at_end=False)]).train()
    assert any(not torch.equal(b, layer.u_latent) for b, layer in zip(before, experts.down_layers, strict=True))
    model.eval()
    model.save_pretrained(tmp_path / "q")  # packed format, written from trainable mode
    keys = load_file(str(tmp_path / "q" / "model.safetensors")).keys()
    assert not any("latent" in k for k in keys) and any(".experts.down_layers.0.u_bits" in k for k in keys)
    model.littlebit_pack()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))
