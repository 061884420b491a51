"""Calibration data: whatever the user hands us, turned into a fixed ``(samples, seqlen)`` tensor of token ids.

Accepted sources: ``"default"`` (the project's training split of the bundled corpora), a string, a list of strings,
a ``datasets.Dataset`` (its ``text`` column), or token ids (a 1-D stream or a 2-D batch). Text paragraphs are put in a
seeded random order, tokenised as one stream (only as much as needed) and cut into non-overlapping windows;
``samples`` of them are drawn with a seeded generator. Everything that can
be wrong with the input (empty, too short, ids outside the model's vocabulary, a tokenizer that maps most of the text
to ``<unk>``) is reported here, before any quantization work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CalibrationError
from ..eval.perplexity import tokenize_stream, tokenizer_bos

DEFAULT_SOURCE = "default"


def describe_source(source: Any) -> str:
    """A short, JSON-friendly description of a calibration source (what the saved config records)."""
    if source is None or (isinstance(source, str) and source == DEFAULT_SOURCE):
        return "default: hf_littlebit training split (Wikipedia + BBC news)"
    if isinstance(source, str):
        return f"text ({len(source)} characters)"
    if isinstance(source, torch.Tensor):
        return f"token ids {list(source.shape)}"
    if hasattr(source, "column_names"):
        return f"datasets.Dataset ({len(source)} rows)"
    if isinstance(source, Sequence):
        return f"{len(source)} texts"
    return type(source).__name__


def _source_text(source: Any, cache_dir: str | None) -> str:
    if source is None or (isinstance(source, str) and source == DEFAULT_SOURCE):
        from ..assets import ensure_assets

        return ensure_assets(cache_dir, model=False).text("train")
    if isinstance(source, str):
        return source
    if hasattr(source, "column_names"):  # datasets.Dataset, without importing datasets
        if "text" not in source.column_names:
            raise CalibrationError(
                f"calibration dataset has no 'text' column (columns: {source.column_names}); "
                "rename the text column to 'text' or pass token ids"
            )
        return "\n\n".join(t for t in source["text"] if t)
    if isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        return "\n\n".join(t for t in source if t)
    raise CalibrationError(
        f"unsupported calibration input of type {type(source).__name__}; pass 'default', a string, a list of "
        "strings, a datasets.Dataset with a 'text' column, or a tensor of token ids"
    )


def _check_ids(ids: torch.Tensor, vocab_size: int | None, tokenizer: Any | None) -> None:
    if ids.numel() == 0:
        raise CalibrationError("calibration input is empty")
    if ids.is_floating_point() or ids.is_complex():
        raise CalibrationError(f"calibration token ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        raise CalibrationError(
            f"calibration token ids span [{ids.min().item()}, {ids.max().item()}] but the model's vocabulary has "
            f"{vocab_size} entries: the ids come from a different tokenizer"
        )
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer is not None else None
    if unk is not None and (ids == unk).float().mean() > 0.5:
        raise CalibrationError(
            "more than half of the calibration text maps to the unknown token: the tokenizer does not match the "
            "text or the model"
        )


def _tokenize_enough(tokenizer: Any, text: str, needed: int, seed: int) -> torch.Tensor:
    """Token stream of a seeded shuffle of the text's paragraphs, tokenising only as many as the samples need.

    Tokenising a whole corpus (millions of characters) costs more than calibrating a small model; paragraphs are
    taken in random order until the estimate (4 characters per token, with a safety factor) is covered, and the
    amount doubles until the stream is long enough or the text is used up.
    """
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(seed)).tolist()
    budget = needed * 8
    while True:
        chosen, size = [], 0
        for i in order:
            chosen.append(paragraphs[i])
            size += len(paragraphs[i]) + 2
            if size >= budget:
                break
        stream = tokenize_stream(tokenizer, "\n\n".join(chosen))
        if stream.numel() >= needed * 1.05 or len(chosen) == len(paragraphs):
            return stream
        budget *= 2


def calibration_tokens(
    source: Any,
    tokenizer: Any | None,
    samples: int,
    seqlen: int,
    seed: int = 0,
    vocab_size: int | None = None,
    cache_dir: str | None = None,
) -> torch.Tensor:
    """``(samples, seqlen)`` int64 token ids drawn from ``source`` (see the module docstring)."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"need samples ≥ 1 and seqlen ≥ 2, got samples={samples}, seqlen={seqlen}")
    if isinstance(source, torch.Tensor):
        ids = source.detach().cpu()
        if ids.dim() not in (1, 2):
            raise CalibrationError(f"calibration token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
        _check_ids(ids, vocab_size, None)
        if ids.dim() == 2:
            if ids.shape[1] < seqlen:
                raise CalibrationError(
                    f"calibration sequences have {ids.shape[1]} tokens, fewer than seqlen={seqlen}; "
                    "lower calibration_seqlen or pass longer sequences"
                )
            windows = ids[:, :seqlen]
        else:
            windows = None
            stream = ids
        bos = None
    else:
        if tokenizer is None:
            raise CalibrationError(
                "calibration text needs a tokenizer: pass tokenizer=... (or token ids instead of text)"
            )
        text = _source_text(source, cache_dir)
        if not text.strip():
            raise CalibrationError("calibration text is empty")
        stream = _tokenize_enough(tokenizer, text, samples * seqlen, seed)
        _check_ids(stream, vocab_size, tokenizer)
        windows = None
        bos = tokenizer_bos(tokenizer)
    if windows is None:
        step = seqlen - 1 if bos is not None else seqlen
        n_windows = stream.numel() // step
        if n_windows < samples:
            raise CalibrationError(
                f"calibration input has {stream.numel()} tokens: {n_windows} window(s) of {seqlen}, fewer than the "
                f"{samples} samples asked for; give more text or lower calibration_samples / calibration_seqlen"
            )
        windows = stream[: n_windows * step].view(n_windows, step)
        if bos is not None:
            windows = torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], dim=1)
    elif windows.shape[0] < samples:
        raise CalibrationError(
            f"calibration input has {windows.shape[0]} sequences, fewer than the {samples} samples asked for"
        )
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.shape[0], generator=generator)[:samples].sort().values
    return windows[pick].to(torch.int64).contiguous()
