"""The common currency of every factoriser: one binary low-rank path ``diag(h) · sgn(U) · diag(l) · sgn(V) · diag(g)``.

Nothing here knows about Transformers or modules: plain tensors in, plain tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """``sgn`` with ``sgn(0) = +1`` (the convention of the packed format)."""
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


@dataclass
class FactorPath:
    """One path of a LittleBit layer.

    ``u`` (d_out × r) and ``v`` (r × d_in) are *latent* factors: only their signs are stored, but keeping the
    continuous values lets the residual fit, later rotations and QAT start from them. ``h``, ``l``, ``g`` are the
    output-channel, latent and input-channel scales in their storage dtype.
    """

    u: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    l: torch.Tensor  # noqa: E741 - the paper's name for the latent scale
    g: torch.Tensor

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``Ŵ`` (d_out × d_in) from the hard signs and the stored scales."""
        su = binary_sign(self.u).to(dtype) * self.l.to(dtype)
        sv = binary_sign(self.v).to(dtype)
        return self.h.to(dtype)[:, None] * (su @ sv) * self.g.to(dtype)[None, :]

    def with_scale_dtype(self, dtype: torch.dtype, name: str = "layer") -> FactorPath:
        """Cast the scales to their storage dtype, refusing values the dtype cannot hold."""
        cast = [t.to(dtype) for t in (self.h, self.l, self.g)]
        for label, src, dst in zip("hlg", (self.h, self.l, self.g), cast, strict=True):
            if not torch.isfinite(dst).all():
                raise ValueError(
                    f"{name}: scale vector '{label}' (max |x| = {src.abs().max().item():.3g}) overflows {dtype}; "
                    "use LittleBitConfig(scale_dtype='bfloat16') or 'float32' for this model."
                )
        return FactorPath(self.u, self.v, *cast)


def balance_scales(
    h: torch.Tensor, l: torch.Tensor, g: torch.Tensor  # noqa: E741
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rescale ``h, l, g`` to a common RMS without changing ``h ⊗ l ⊗ g``.

    The split of magnitude between the three vectors is arbitrary; equalising it keeps every vector well inside
    the fp16 range (no overflow of one, underflow of another).
    """
    rms = [t.pow(2).mean().sqrt() for t in (h, l, g)]
    if any(r == 0 for r in rms):
        return h, l, g
    target = (rms[0] * rms[1] * rms[2]) ** (1.0 / 3.0)
    return h * (target / rms[0]), l * (target / rms[1]), g * (target / rms[2])


def relative_error(weight: torch.Tensor, paths: list[FactorPath]) -> float:
    """``‖W − Σ Ŵ_path‖_F / ‖W‖_F`` in fp32."""
    w = weight.float()
    approx = sum(p.reconstruct() for p in paths)
    return (torch.linalg.norm(w - approx) / torch.linalg.norm(w).clamp_min(1e-30)).item()
