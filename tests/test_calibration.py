"""Calibration input: every accepted source, determinism, and the errors raised before any work."""

from __future__ import annotations

import pytest
import torch

from hf_littlebit import CalibrationError
from hf_littlebit.quantize.calibration import calibration_tokens, describe_source

from .conftest import fake_text, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def test_text_sources_give_fixed_shape_and_are_deterministic(tok):
    texts = [fake_text(300, seed=i) for i in range(4)]
    a = calibration_tokens(texts, tok, samples=5, seqlen=16, seed=3, vocab_size=128)
    b = calibration_tokens(texts, tok, samples=5, seqlen=16, seed=3, vocab_size=128)
    c = calibration_tokens(texts, tok, samples=5, seqlen=16, seed=4, vocab_size=128)
    assert a.shape == (5, 16) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    single = calibration_tokens(" ".join(texts), tok, samples=5, seqlen=16, vocab_size=128)
    assert single.shape == (5, 16)


def test_dataset_like_and_token_sources(tok):
    class FakeDataset:
        column_names = ["text"]

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, key):
            assert key == "text"
            return self.rows

    ds = FakeDataset([fake_text(200, seed=i) for i in range(3)])
    assert calibration_tokens(ds, tok, samples=4, seqlen=20, vocab_size=128).shape == (4, 20)
    assert "Dataset (3 rows)" in describe_source(ds)
    stream = torch.randint(0, 128, (500,))
    windows = calibration_tokens(stream, None, samples=3, seqlen=50)
    assert windows.shape == (3, 50)
    batch = torch.randint(0, 128, (6, 40))
    picked = calibration_tokens(batch, None, samples=4, seqlen=32)
    assert picked.shape == (4, 32)
    assert all(any(torch.equal(row, b[:32]) for b in batch) for row in picked)


@pytest.mark.parametrize(
    "source, kwargs, match",
    [
        ("", {}, "empty"),
        ("   ", {}, "empty"),
        ("the of and", {}, "fewer than the"),
        (torch.randint(0, 500, (400,)), {"vocab_size": 128}, "different tokenizer"),
        (torch.rand(400), {}, "must be integers"),
        (torch.randint(0, 128, (3, 8)), {}, "fewer than seqlen"),
        (torch.randint(0, 128, (2, 40)), {}, "fewer than the 4 samples"),
        (12345, {}, "unsupported calibration input"),
        ("zzz qqq xxx " * 200, {}, "unknown token"),
    ],
)
def test_bad_calibration_input_is_refused_with_a_reason(tok, source, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        calibration_tokens(source, tok, samples=4, seqlen=16, **kwargs)


def test_text_without_tokenizer_and_dataset_without_text_column():
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        calibration_tokens("some text", None, samples=1, seqlen=4)

    class NoText:
        column_names = ["content"]

    with pytest.raises(CalibrationError, match="no 'text' column"):
        calibration_tokens(NoText(), make_tiny_tokenizer(), samples=1, seqlen=4)
