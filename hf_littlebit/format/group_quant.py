"""The few-bit group format of a matrix (the token embedding's alternative to binary low-rank with ``whole_model``).

Each row is cut into groups of ``group_size`` consecutive columns (the last group is shorter when ``group_size``
does not divide the row). Entry ``x`` of a group is stored as a ``bits``-bit code ``q`` and read back as
``zero + scale · q``, with one ``scale`` and one ``zero`` per group (asymmetric: the group's codes cover any interval
``[zero, zero + (2^bits − 1) · scale]``), both fp16.

**Packing.** The codes of a row form one bit stream, code ``j`` at stream bits ``j·bits … j·bits + bits − 1`` (least
significant first); stream bit ``b`` is bit ``b mod 32`` of int32 word ``b // 32`` (two's complement, as
:mod:`~hf_littlebit.format.packing` stores signs). With 3, 5, 6 or 7 bits a code may straddle two words. A
``(rows, cols)`` code matrix packs to ``(rows, ⌈cols · bits / 32⌉)`` int32 words: ``bits`` per entry plus less than
one word of padding per row, and nothing else.

**Quantizer** (:func:`quantize_groups`, deterministic): per group, a grid of ranges shrunk around the group's
midpoint (from its full min–max down to 40 % of it: clipping a few outliers buys resolution for the rest), each
scored by its squared error with the fp16-rounded scale and zero; then a few least-squares refits of scale and zero
to the codes the best range gave (re-coding after each), a refit kept only where it lowers the group's error.
"""

from __future__ import annotations

import math

import torch

from .packing import WORD_BITS

SUPPORTED_BITS = tuple(range(1, 9))
SHRINK_GRID = tuple(1.0 - 0.05 * i for i in range(13))  # 1.00, 0.95, ..., 0.40 of the group's range
REFITS = 4


def packed_code_width(cols: int, bits: int) -> int:
    """int32 words holding one row of ``cols`` codes of ``bits`` bits."""
    return (cols * bits + WORD_BITS - 1) // WORD_BITS


def group_count(cols: int, group_size: int) -> int:
    return (cols + group_size - 1) // group_size


def group_quant_bits(rows: int, cols: int, bits: int, group_size: int, scale_bits: int = 16) -> int:
    """Bits the format really stores for a ``rows × cols`` matrix: code words (padding included), scales, zeros."""
    return rows * (packed_code_width(cols, bits) * WORD_BITS + 2 * scale_bits * group_count(cols, group_size))


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"group quantization supports {SUPPORTED_BITS[0]}–{SUPPORTED_BITS[-1]} bits, got {bits!r}")


def _positions(cols: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(cols, dtype=torch.int64, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of integer codes in ``[0, 2^bits)`` into int32 words (the module docstring's layout)."""
    _check_bits(bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"pack_codes expects a 2-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    width = packed_code_width(cols, bits)
    word, offset = _positions(cols, bits, codes.device)
    words = torch.zeros(rows, width + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(1, word, (c << offset) & 0xFFFFFFFF)  # the code's bits inside its first word
    words.index_add_(1, word + 1, c >> (WORD_BITS - offset))  # and those that straddle into the next one
    unsigned = words[:, :width]  # bits never overlap, so the sums are ORs; the extra column stays zero
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def unpack_codes(words: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(rows, width)`` int32 → ``(rows, cols)`` int32 codes (int32 arithmetic
    throughout: this runs on every lookup and on every chunk of a tied head)."""
    _check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != packed_code_width(cols, bits):
        raise ValueError(f"unpack_codes: expected int32 words of shape (rows, {packed_code_width(cols, bits)}) for "
                         f"{cols} codes of {bits} bits, got {words.dtype} {tuple(words.shape)}")
    mask = (1 << bits) - 1
    if WORD_BITS % bits == 0:  # no code straddles a word: shift each word once per code it holds
        shifts = torch.arange(WORD_BITS // bits, dtype=torch.int32, device=words.device) * bits
        codes = (words.unsqueeze(-1) >> shifts) & mask  # arithmetic shift; the mask drops the sign copies
        return codes.reshape(words.shape[0], -1)[:, :cols]
    word, offset = _positions(cols, bits, words.device)
    offset = offset.to(torch.int32)
    low = words[:, word] >> offset  # arithmetic shift: bits above a straddling code's first part are sign copies
    codes = low & mask
    straddle = (offset + bits > WORD_BITS).nonzero().squeeze(1)
    if straddle.numel():  # the code's first part from its word, the rest from the low bits of the next word
        kept = WORD_BITS - offset[straddle]  # 1 … bits − 1 bits in the first word
        high = words[:, word[straddle] + 1] << kept
        codes[:, straddle] = ((low[:, straddle] & ((1 << kept) - 1)) | high) & mask
    return codes


def _per_column(values: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """(rows, groups) per-group values → (rows, cols), each group's value repeated over its columns."""
    return values.repeat_interleave(group_size, dim=1)[:, :cols]


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``zero + scale · q`` per entry (computed in fp32, returned in ``dtype``) from unpacked ``codes``."""
    cols = codes.shape[1]
    q = codes.to(torch.float32)
    if cols % group_size == 0:
        shape = (codes.shape[0], cols // group_size, group_size)
        out = torch.addcmul(zeros.float().unsqueeze(-1), scales.float().unsqueeze(-1), q.view(shape))
        return out.reshape(codes.shape).to(dtype)
    s, z = (_per_column(t.float(), cols, group_size) for t in (scales, zeros))
    return torch.addcmul(z, s, q).to(dtype)


@torch.no_grad()
def quantize_groups(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
                    chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (int64, ``rows × cols``), scales and zeros (``scale_dtype``, ``rows × groups``) of ``weight`` (module
    docstring), ``chunk_rows`` rows at a time so the working memory stays a few copies of one chunk."""
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize_groups expects a 2-D tensor, got shape {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    parts = [_quantize_chunk(weight[i:i + chunk_rows].float(), bits, group_size, scale_dtype)
             for i in range(0, weight.shape[0], chunk_rows)]
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))  # type: ignore[return-value]


def _quantize_chunk(x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    groups = group_count(cols, group_size)
    pad = groups * group_size - cols
    top = float((1 << bits) - 1)
    valid = torch.ones(1, groups, group_size, device=x.device)
    if pad:
        valid.view(1, -1)[:, cols:] = 0
    xg = torch.nn.functional.pad(x, (0, pad)).view(rows, groups, group_size)
    lo = xg.masked_fill(valid == 0, math.inf).amin(-1)
    hi = xg.masked_fill(valid == 0, -math.inf).amax(-1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    finfo = torch.finfo(scale_dtype)

    def rounded(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scale.clamp(min=finfo.tiny, max=finfo.max)  # a constant group: any positive scale, code 0 exact
        return scale.to(scale_dtype).float().clamp(min=finfo.tiny), zero.clamp(-finfo.max, finfo.max).to(
            scale_dtype).float()

    def encode(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = ((xg - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).round_().clamp_(0, top)
        err = ((zero.unsqueeze(-1) + scale.unsqueeze(-1) * q - xg).square_() * valid).sum(-1)
        return q, err

    best_s = best_z = best_q = best_err = None
    for shrink in SHRINK_GRID:
        s, z = rounded(2 * half * shrink / top, mid - half * shrink)
        q, err = encode(s, z)
        if best_err is None:
            best_s, best_z, best_q, best_err = s, z, q, err
            continue
        better = err < best_err
        best_s, best_z, best_err = (torch.where(better, a, b) for a, b in ((s, best_s), (z, best_z), (err, best_err)))
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    n = valid.sum(-1)
    for _ in range(REFITS):  # least squares of x ≈ zero + scale · q over each group, codes fixed
        q = best_q * valid
        sq, sqq = q.sum(-1), q.square().sum(-1)
        sx, sqx = (xg * valid).sum(-1), (q * xg).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        scale = torch.where(ok, (n * sqx - sq * sx) / det.clamp(min=1e-30), best_s)
        zero = torch.where(ok, (sx - scale * sq) / n, best_z)
        s, z = rounded(scale.clamp(min=0), zero)
        q, err = encode(s, z)
        better = err < best_err
        best_s, best_z, best_err = (torch.where(better, a, b) for a, b in ((s, best_s), (z, best_z), (err, best_err)))
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
    codes = best_q.reshape(rows, -1)[:, :cols].to(torch.int64)
    return codes, best_s.to(scale_dtype), best_z.to(scale_dtype)
