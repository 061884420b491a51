"""Dual-SVID against the numerical facts of METHODS.md §8 (F4, F7) on synthetic matrices."""

import pytest
import torch

from hf_littlebit.factorize import binary_sign, factorize, relative_error
from hf_littlebit.factorize.base import FactorPath
from hf_littlebit.factorize.dual_svid import balanced_svd_factors, dual_svid, rank1_nonnegative


def gauss(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5


def coherent_power_law(n, seed=0):
    """σ_k = k^-½ with singular vectors from QR of Student-t(2) matrices (METHODS.md `pl05_coh`)."""
    torch.manual_seed(seed)
    t = torch.distributions.StudentT(2.0)
    p, _ = torch.linalg.qr(t.sample((n, n)).double())
    q, _ = torch.linalg.qr(t.sample((n, n)).double())
    return (p * torch.arange(1, n + 1).double() ** -0.5) @ q.T


def channel_scaled(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    rows = torch.exp(0.7 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    cols = torch.exp(0.7 * torch.randn(1, n, generator=g, dtype=torch.float64))
    return rows * base * cols


@pytest.fixture(scope="module")
def matrices():
    return {"gauss": gauss(1024), "pl05_coh": coherent_power_law(1024), "chan_scaled": channel_scaled(1024)}


def err(w, rank, residual):
    return relative_error(w, factorize(w, rank, residual=residual, scale_dtype=torch.float32))


def test_f4_gauss_one_bit(matrices):
    # 1024², 1.0 bpw: rank 488 without residual, 232 per path with it
    assert err(matrices["gauss"], 488, False) == pytest.approx(0.80, abs=0.01)
    assert err(matrices["gauss"], 232, True) == pytest.approx(0.772, abs=0.01)


def test_f4_coherent_spectrum_is_hard_for_dual_svid(matrices):
    assert err(matrices["pl05_coh"], 488, False) >= 0.95


@pytest.mark.parametrize("family", ["gauss", "pl05_coh", "chan_scaled"])
def test_f4_residual_helps_at_equal_budget(matrices, family):
    # 0.55 bpw on 1024²: rank 256 single path vs 120 per path with residual
    assert err(matrices[family], 120, True) < err(matrices[family], 256, False)


def test_f7_factorised_forward_equals_dense_product():
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    path = dual_svid(w, 64)
    x = torch.randn(10, 384)
    su, sv = binary_sign(path.u), binary_sign(path.v)
    five_step = ((((x * path.g) @ sv.T) * path.l) @ su.T) * path.h
    dense = x @ path.reconstruct().T
    assert (five_step - dense).norm() / dense.norm() < 5e-6


def test_f7_rotation_invariance_of_the_latent_product():
    w = gauss(128).float()
    u, v = balanced_svd_factors(w, 32)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    u64, v64 = u.double(), v.double()
    assert ((u64 @ v64) - (u64 @ q) @ (q.T @ v64)).norm() / (u64 @ v64).norm() < 1e-12


def test_balanced_split_and_nonnegative_scales():
    w = channel_scaled(200).float()
    u, v = balanced_svd_factors(w, 40)
    s = torch.linalg.svdvals(w)[:40]
    assert torch.allclose(u.norm(dim=0) ** 2, s, rtol=1e-4)
    assert torch.allclose(v.norm(dim=1) ** 2, s, rtol=1e-4)
    path = dual_svid(w, 40)
    for t in (path.h, path.l, path.g):
        assert (t >= 0).all()


def test_rank1_power_iteration_matches_svd():
    a = torch.rand(300, 40, generator=torch.Generator().manual_seed(3))
    p, q = rank1_nonnegative(a)
    u, s, vh = torch.linalg.svd(a)
    top = s[0] * torch.outer(u[:, 0], vh[0])
    assert torch.allclose(torch.outer(p, q), top, atol=1e-5)


def test_residual_path_fits_what_the_stored_main_path_leaves():
    w = gauss(96).float()
    main, res = factorize(w, 16, residual=True, scale_dtype=torch.float16)
    assert main.h.dtype == torch.float16
    # the residual was fitted to W minus the main path *with rounded scales*
    refit = dual_svid(w - main.reconstruct(), 16)
    assert torch.equal(binary_sign(refit.u), binary_sign(res.u))
    assert relative_error(w, [main, res]) < relative_error(w, [main])


def test_rank_above_dimensions_is_padded_with_zero_scales():
    w = gauss(12).float()[:, :10]
    path = dual_svid(w, 16)
    assert path.u.shape == (12, 16) and path.v.shape == (16, 10)
    assert torch.all(path.l[10:] == 0)


def test_deterministic_and_errors():
    w = gauss(64).float()
    a = factorize(w, 8, seed=3)
    b = factorize(w, 8, seed=3)
    assert all(torch.equal(x.u, y.u) and torch.equal(x.h, y.h) for x, y in zip(a, b, strict=False))
    bad = w.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="layer.7.*NaN"):
        factorize(bad, 8, name="layer.7")
    with pytest.raises(ValueError, match="unknown factorisation method"):
        factorize(w, 8, method="nope")
    with pytest.raises(ValueError, match="overflows"):
        FactorPath(w, w, torch.tensor([1e6]), torch.ones(1), torch.ones(1)).with_scale_dtype(torch.float16, "x")
    zero = factorize(torch.zeros(16, 16), 8)
    assert all(torch.count_nonzero(p.reconstruct()) == 0 for p in zero)
