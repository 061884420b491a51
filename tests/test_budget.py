import pytest

from hf_littlebit.format.budget import choose_rank, paper_bpw, paper_rank, rank_float, stored_bits, true_bpw

# METHODS.md F3: (d_in, d_out, bpw) → (rank, actual bpw) with / without residual.
F3 = [
    (4096, 4096, 1.0, (1000, 0.99409), (2024, 0.99802)),
    (4096, 4096, 0.55, (544, 0.54791), (1104, 0.54793)),
    (4096, 4096, 0.1, (80, 0.09390), (184, 0.09783)),
    (4096, 11008, 1.0, (1472, 0.99796), (2960, 0.99796)),
    (11008, 4096, 1.0, (1472, 0.99796), (2960, 0.99796)),
    (4096, 11008, 0.1, (128, 0.09657), (280, 0.09925)),
    (4096, 1024, 0.55, (208, 0.54846), (432, 0.54852)),
    (64, 64, 1.0, (8, 1.5625), (8, 0.78125)),
    (64, 64, 0.1, (8, 1.5625), (8, 0.78125)),
]


@pytest.mark.parametrize("d_in,d_out,bpw,res,nores", F3)
def test_rank_rule_matches_the_paper_table(d_in, d_out, bpw, res, nores):
    for residual, (rank, actual) in ((True, res), (False, nores)):
        assert paper_rank(d_in, d_out, bpw, residual) == rank
        assert paper_bpw(d_in, d_out, rank, residual) == pytest.approx(actual, abs=5e-6)


def test_rank_rule_formula_and_rounding():
    # the float formula, truncated then rounded down to a multiple of 8
    for d_in, d_out, bpw in [(576, 576, 0.55), (576, 1536, 1.0), (1536, 576, 0.3), (4096, 4096, 0.8)]:
        for residual in (True, False):
            r = paper_rank(d_in, d_out, bpw, residual)
            assert r % 8 == 0
            assert r <= max(rank_float(d_in, d_out, bpw, residual), 8)
            assert r + 8 > rank_float(d_in, d_out, bpw, residual)


def test_kv_factor_doubles_the_float_rank():
    assert paper_rank(4096, 1024, 0.55, True, factor=2.0) == 416


def test_choose_rank_floor_and_cap():
    small = choose_rank(64, 64, 0.1, True, min_rank=8)
    assert small.rank == 8 and small.floored and not small.capped
    huge = choose_rank(64, 64, 16.0, False, min_rank=8)
    assert huge.rank == 64 and huge.capped
    tiny = choose_rank(4, 6, 1.0, True, min_rank=8)
    assert tiny.rank == 4 and tiny.floored and tiny.capped
    normal = choose_rank(4096, 4096, 1.0, True)
    assert normal.rank == 1000 and not normal.floored and not normal.capped


def test_stored_bits_count_padding_and_scales():
    # 4096x4096, r=1000 residual: U rows pad 1000 -> 1024 bits
    bits = stored_bits(4096, 4096, 1000, True)
    assert bits == 2 * ((4096 * 1024 + 1000 * 4096) + 16 * (4096 + 1000 + 4096))
    assert true_bpw(4096, 4096, 1000, True) > paper_bpw(4096, 4096, 1000, True)
    assert true_bpw(4096, 4096, 1000, True) == pytest.approx(1.00, abs=0.02)
