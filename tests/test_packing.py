import itertools

import pytest
import torch

from hf_littlebit.format.packing import pack_signs, packed_width, unpack_signs


def signs_of(x):
    return torch.where(x < 0, -1.0, 1.0)


def test_known_words_from_the_format_spec():
    row = torch.ones(1, 32)
    row[0, 0] = -1
    assert pack_signs(row).tolist() == [[1]]
    row = torch.ones(1, 32)
    row[0, 31] = -1
    assert pack_signs(row).tolist() == [[-(2**31)]]
    row = torch.ones(1, 33)
    row[0, 32] = -1
    assert pack_signs(row).tolist() == [[0, 1]]
    assert pack_signs(-torch.ones(1, 32)).tolist() == [[-1]]
    assert pack_signs(torch.ones(2, 5)).tolist() == [[0], [0]]


@pytest.mark.parametrize("width", [1, 7, 8, 31, 32, 33, 63, 64, 65, 100, 257])
def test_random_round_trip_any_width(width):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(37, width, generator=gen)
    packed = pack_signs(x)
    assert packed.dtype == torch.int32 and packed.shape == (37, packed_width(width))
    assert torch.equal(unpack_signs(packed, width), signs_of(x))


@pytest.mark.parametrize("width", [1, 2, 5, 10])
def test_exhaustive_patterns_small_widths(width):
    patterns = torch.tensor(list(itertools.product([1.0, -1.0], repeat=width)))
    assert torch.equal(unpack_signs(pack_signs(patterns), width), patterns)


def test_every_single_bit_position_of_a_word():
    # one -1 per row, at every column of two words: catches shift-direction bugs (the upstream defect).
    eye = torch.ones(64, 64) - 2 * torch.eye(64)
    packed = pack_signs(eye)
    assert torch.equal(unpack_signs(packed, 64), eye)
    assert packed[:32, 0].tolist() == [(1 << j) - (2**32 if j == 31 else 0) for j in range(32)]


def test_zero_maps_to_plus_one_and_padding_is_zero_bits():
    x = torch.zeros(3, 5)
    x[1, 2] = -0.0  # negative zero is still zero → +1
    assert pack_signs(x).tolist() == [[0], [0], [0]]
    assert torch.equal(unpack_signs(pack_signs(x), 5), torch.ones(3, 5))


def test_unpack_dtype_and_errors():
    packed = pack_signs(torch.randn(4, 40))
    assert unpack_signs(packed, 40, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_signs(packed, 70)
    with pytest.raises(ValueError, match="int32"):
        unpack_signs(packed.to(torch.int64), 40)
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(torch.randn(2, 3, 4))
