"""A short GPTQ reference (bench only): the calibrated scalar peer of issue 19, on the same calibration tokens.

No maintained GPTQ package runs on a CPU-only torch here (AutoGPTQ / GPTQModel build CUDA extensions), so this is a
plain implementation of the published algorithm, written for this benchmark:

- blocks in order; each block's Linears see inputs from the *already quantized* prefix (the block's inputs are the
  previous quantized block's outputs), their Hessian ``H = 2/n Σ x xᵀ`` accumulated by forward hooks;
- per Linear: dampening ``λ = 1% · mean(diag H)``, dead inputs zeroed, the upper Cholesky factor of ``H⁻¹``; columns
  quantized left to right in lazy batches of 128, each column's rounding error spread over the columns not yet
  quantized through that factor (the optimal-brain-surgeon update);
- asymmetric min–max round-to-nearest with one fp16 scale and one fp16 zero per group of ``group`` input columns per
  row (stored bits counted as ``nbits`` per weight + 32 per group, the same accounting as the HQQ rows). One
  deviation from the reference code: a group's grid is taken from its columns *after* the error updates of the
  current lazy batch (the reference takes it before them); CPU only (Hessians on the CPU).

``gptq_(model, tokens, nbits, group)`` quantizes in place (fake-quantized fp weights) and returns
``(stored bits, weights)`` of the decoder Linears (LM head untouched, like the LittleBit rows).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_littlebit.quantize.reconstruct.capture import block_output, capture_block_inputs, find_blocks

LAZY_COLUMNS = 128


def quantize_columns(w: torch.Tensor, hessian: torch.Tensor, nbits: int, group: int, damp: float = 0.01
                     ) -> torch.Tensor:
    """GPTQ of one weight (d_out × d_in) given its input Hessian (d_in × d_in); returns the fake-quantized weight."""
    if LAZY_COLUMNS % group:
        raise ValueError(f"group {group} must divide {LAZY_COLUMNS}")
    w = w.detach().float().clone()
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = 2 ** nbits - 1
    q_all = torch.zeros_like(w)
    d_in = w.shape[1]
    for start in range(0, d_in, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, d_in)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:stop, start:stop]
        for i in range(stop - start):
            if i % group == 0:  # the group's grid from its current (already error-corrected) columns
                cols = block[:, i:i + group]
                lo = cols.min(dim=1).values.clamp(max=0.0)
                hi = cols.max(dim=1).values.clamp(min=0.0)
                scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
                zero = torch.round(-lo / scale)
            col = block[:, i]
            q = (torch.clamp(torch.round(col / scale) + zero, 0, levels) - zero) * scale
            q_all[:, start + i] = q
            err = (col - q) / hblock[i, i]
            block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return q_all


def _accumulate(hessians: dict[str, torch.Tensor], counts: dict[str, int], name: str):
    """Forward hook adding ``2 x xᵀ`` of the Linear's inputs to its Hessian."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        hessians[name].addmm_(x.T, x, alpha=2.0)
        counts[name] += x.shape[0]
    return hook


@torch.no_grad()
def gptq_(model: nn.Module, tokens: torch.Tensor, nbits: int, group: int = 128, batch_size: int = 4
          ) -> tuple[int, int]:
    """Quantize every Linear inside the transformer blocks of ``model`` in place (see the module docstring)."""
    _, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, tokens, batch_size, None)
    bits = weights = 0
    for index, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        hessians = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        counts = dict.fromkeys(linears, 0)

        handles = [m.register_forward_hook(_accumulate(hessians, counts, n)) for n, m in linears.items()]
        for x in inputs:
            block_output(block, x, kwargs[index])
        for handle in handles:
            handle.remove()
        for name, layer in linears.items():
            q = quantize_columns(layer.weight, hessians[name] / max(counts[name], 1), nbits, group)
            layer.weight.copy_(q.to(layer.weight.dtype))
            n = layer.weight.numel()
            bits += nbits * n + 32 * layer.out_features * -(-layer.in_features // group)
            weights += n
        outputs = [block_output(block, x, kwargs[index]) for x in inputs]
        inputs.clear()
        for y in outputs:
            inputs.append(y)
    return bits, weights
