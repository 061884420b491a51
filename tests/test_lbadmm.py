"""LB-ADMM (NanoQuant's latent-binary ADMM initialiser): format, latents, quality against DBF-ADMM, config plumbing."""

from __future__ import annotations

import pytest
import torch

from hf_littlebit import LittleBitConfig
from hf_littlebit.factorize import binary_sign, factorize
from hf_littlebit.factorize.lbadmm import lb_admm


def heavy_tailed(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Student-t weight with a weak low-rank part, and heavy-tailed input / skewed output importances."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((d_out, d_in)) + torch.randn(d_out, 8) @ torch.randn(8, d_in) / 3
    d_in_imp = torch.distributions.StudentT(2.5).sample((d_in,)).pow(2) + 0.01
    d_out_imp = torch.rand(d_out) + 0.1
    return w, d_in_imp, d_out_imp


def preconditioned_error(w, imp_in, imp_out, paths) -> float:
    scale = imp_out.sqrt()[:, None] * imp_in.sqrt()[None, :]
    approx = sum(p.reconstruct() for p in paths)
    return ((w - approx) * scale).norm().item() / (w * scale).norm().item()


@pytest.mark.parametrize("seed,shape,rank", [(0, (96, 160), 24), (1, (128, 128), 32), (2, (128, 128), 32)])
def test_lbadmm_beats_dbf_admm_on_the_preconditioned_error(seed, shape, rank):
    w, imp_in, imp_out = heavy_tailed(*shape, seed)

    def error(method: str, n_iter: int) -> float:
        paths = factorize(w, rank, method=method, residual=False, options={"n_iter": n_iter},
                          input_importance=imp_in, output_importance=imp_out)
        return preconditioned_error(w, imp_in, imp_out, paths)

    # each at its published iteration count: DBF's 100 alternations of 3 ADMM steps, LB-ADMM's 400 single steps
    assert error("lbadmm", 400) < error("dbf", 100)


def test_lbadmm_path_is_consistent_and_its_latents_carry_confidence():
    w, _, _ = heavy_tailed(64, 96, 3)
    path = lb_admm(w, 16, torch.Generator().manual_seed(0), n_iter=60)
    assert path.u.shape == (64, 16) and path.v.shape == (16, 96)
    assert path.h.shape == (64,) and path.l.shape == (16,) and path.g.shape == (96,)
    # the stored product is diag(h) sgn(U) diag(l) sgn(V) diag(g), and it approximates W
    expected = path.h[:, None] * ((binary_sign(path.u) * path.l) @ binary_sign(path.v)) * path.g[None, :]
    torch.testing.assert_close(path.reconstruct(), expected)
    assert (w - path.reconstruct()).norm() < 0.8 * w.norm()
    # continuous latents, not ±c: magnitudes differ within a column (unit columns, well inside STE's band)
    assert path.u.abs().std(0).min() > 0 and path.u.abs().max() < 1.0
    torch.testing.assert_close(path.u.norm(dim=0), torch.ones(16))
    # deterministic for a generator seed
    again = lb_admm(w, 16, torch.Generator().manual_seed(0), n_iter=60)
    assert torch.equal(path.u, again.u) and torch.equal(path.h, again.h)


def test_lbadmm_rank_above_the_matrix_and_errors():
    w = torch.randn(8, 12)
    path = lb_admm(w, 20, torch.Generator().manual_seed(0), n_iter=10)  # over-complete rank still factors
    assert path.rank == 20 and torch.isfinite(path.reconstruct()).all()
    with pytest.raises(ValueError, match="n_iter must be ≥ 1"):
        lb_admm(w, 4, n_iter=0)
    with pytest.raises(ValueError, match="ridge must be ≥ 0"):
        lb_admm(w, 4, ridge=-1.0)


def test_config_defaults_for_lbadmm():
    config = LittleBitConfig(method="lbadmm", dbf_iterations=40)
    assert config.residual is False and config.activation_aware is True
    assert config.factorizer_options() == {"n_iter": 40}
    assert LittleBitConfig(method="lbadmm", residual=True).residual is True


def test_lbadmm_residual_path_and_data_free_model(caplog):
    import logging

    import hf_littlebit
    from hf_littlebit.factorize import relative_error

    from .conftest import make_tiny_model

    w, _, _ = heavy_tailed(64, 96, 4)
    one = factorize(w, 12, method="lbadmm", residual=False, options={"n_iter": 40})
    two = factorize(w, 12, method="lbadmm", residual=True, options={"n_iter": 40})
    assert len(two) == 2 and relative_error(w, two) < relative_error(w, one)
    # data-free (D = 1): it converts, and says the activation weighting is off
    caplog.set_level(logging.WARNING)
    model = hf_littlebit.quantize(make_tiny_model("llama"), LittleBitConfig(bpw=1.0, method="lbadmm",
                                                                            dbf_iterations=5), progress=False)
    assert hf_littlebit.summary(model).layers and "factorised unweighted" in caplog.text
