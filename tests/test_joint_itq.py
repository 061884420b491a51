"""LittleBit-2 (Internal Latent Rotation + Joint-ITQ) against METHODS.md §5 and §8 (F4, F5, F7)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_littlebit
from hf_littlebit import LittleBitConfig
from hf_littlebit.factorize import binary_sign, factorize, relative_error
from hf_littlebit.factorize.dual_svid import balanced_svd_factors
from hf_littlebit.factorize.joint_itq import itq_rotation, joint_itq, random_orthogonal

from .test_factorize import channel_scaled, coherent_power_law, gauss


def err(w, method, rank=488, residual=False):
    return relative_error(w, factorize(w, rank, method=method, residual=residual, scale_dtype=torch.float32))


def test_rotation_is_orthogonal_and_leaves_the_product_unchanged():
    w = channel_scaled(160).float()
    u, v = balanced_svd_factors(w, 48)
    rot, _ = itq_rotation(torch.cat([u, v.T]), n_iter=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rot.T @ rot, torch.eye(48), atol=1e-5)
    assert ((u @ rot) @ (rot.T @ v) - u @ v).norm() / (u @ v).norm() < 1e-5
    q = random_orthogonal(32, torch.Generator().manual_seed(1))
    assert torch.allclose(q @ q.T, torch.eye(32), atol=1e-5)


def test_itq_objective_never_increases():
    w = coherent_power_law(256).float()
    u, v = balanced_svd_factors(w, 64)
    _, history = itq_rotation(torch.cat([u, v.T]), n_iter=30, generator=torch.Generator().manual_seed(0))
    assert len(history) == 31
    assert all(b <= a * (1 + 1e-5) for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < history[0]


def test_itq_raises_the_sign_cosine_of_the_factors():
    w = coherent_power_law(256).float()
    u, v = balanced_svd_factors(w, 64)
    x = torch.cat([u, v.T])

    def mean_cosine(m):
        return (m.abs().sum(0) / (m.shape[0] ** 0.5 * m.norm(dim=0))).mean().item()

    rot, _ = itq_rotation(x, n_iter=50, generator=torch.Generator().manual_seed(0))
    assert mean_cosine(x @ rot) > mean_cosine(x) + 0.1


@pytest.fixture(scope="module")
def m1024():
    return {"gauss": gauss(1024), "pl05_coh": coherent_power_law(1024), "chan_scaled": channel_scaled(1024)}


def test_f4_joint_itq_numbers(m1024):
    # METHODS.md F4 (b), (c): 1024², 1.0 bpw, no residual (rank 488)
    assert err(m1024["gauss"], "littlebit2") == pytest.approx(0.71, abs=0.01)
    assert err(m1024["pl05_coh"], "littlebit2") <= 0.63


@pytest.mark.parametrize("family", ["gauss", "pl05_coh", "chan_scaled"])
@pytest.mark.parametrize("rank,residual", [(120, True), (32, False)])
def test_f4_joint_itq_never_worse_than_dual_svid(m1024, family, rank, residual):
    w = m1024[family][:512, :512]
    assert err(w, "littlebit2", rank, residual) <= err(w, "littlebit", rank, residual)


def test_deterministic_per_seed_and_stored_format_unchanged():
    w = gauss(96).float()
    a = joint_itq(w, 16, torch.Generator().manual_seed(5), n_iter=5)
    b = joint_itq(w, 16, torch.Generator().manual_seed(5), n_iter=5)
    c = joint_itq(w, 16, torch.Generator().manual_seed(6), n_iter=5)
    assert torch.equal(a.u, b.u) and torch.equal(a.h, b.h)
    assert not torch.equal(binary_sign(a.u), binary_sign(c.u))
    assert a.u.shape == (96, 16) and a.v.shape == (16, 96) and a.l.shape == (16,)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_littlebit2_quantize_save_reload(arch, fp_checkpoint, tmp_path, tokens):
    cfg = LittleBitConfig(bpw=1.0, method="littlebit2", itq_iterations=10)
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint(arch), quantization_config=cfg)
    plain = AutoModelForCausalLM.from_pretrained(fp_checkpoint(arch), quantization_config=LittleBitConfig(bpw=1.0))
    name = "model.layers.0.mlp.up_proj"
    fp_w = AutoModelForCausalLM.from_pretrained(fp_checkpoint(arch)).get_submodule(name).weight
    err2 = (model.get_submodule(name).dequantize_weight() - fp_w).norm()
    err1 = (plain.get_submodule(name).dequantize_weight() - fp_w).norm()
    assert err2 < err1
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.method == "littlebit2"
    assert again.config.quantization_config.itq_iterations == 10
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    assert hf_littlebit.summary(again).bpw_true == hf_littlebit.summary(plain).bpw_true
