"""``LittleBitLinear``: the packed binary low-rank replacement of ``nn.Linear``.

Per path (main, and optionally residual) the layer stores, as frozen ``nn.Parameter``s (not buffers: PEFT picks the
adapter device from ``next(module.parameters())`` and accelerate only offloads parameters by default):

============  =====================  ====================================================
name          shape / dtype          meaning
============  =====================  ====================================================
``u_bits``    (d_out, ⌈r/32⌉) int32  sgn(U) packed along r, the reduction dim of stage 2
``v_bits``    (r, ⌈d_in/32⌉) int32   sgn(V) packed along d_in, the reduction dim of stage 1
``h``         (d_out,) scale dtype   output-channel scale
``l``         (r,) scale dtype       latent scale
``g``         (d_in,) scale dtype    input-channel scale
============  =====================  ====================================================

The residual path uses the same names with a ``res_`` prefix. ``bias`` stays in full precision.

The forward is ``Y = ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h (+ residual path) + bias``; which implementation runs
is chosen by :mod:`hf_littlebit.backends`. The layer knows nothing of how the factors were found.
"""

from __future__ import annotations

import torch
from torch import nn

from .budget import stored_bits
from .factorize import FactorPath
from .packing import pack_signs, packed_width, unpack_signs

PATH_PREFIXES = ("", "res_")
PATH_TENSORS = ("u_bits", "v_bits", "h", "l", "g")


class LittleBitLinear(nn.Module):
    """Binary low-rank linear layer ``W ≈ Σ_paths diag(h) sgn(U) diag(l) sgn(V) diag(g)``.

    Created empty (optionally on the meta device); filled either by loading a packed state dict, or by
    :meth:`set_factors_` from the output of a factoriser. With ``with_fp_weight=True`` it also exposes an fp
    ``weight`` placeholder so that Transformers routes the checkpoint's dense weight to the quantize-on-load op.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        residual: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
        with_fp_weight: bool = False,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LittleBitLinear: rank must be ≥ 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.residual = residual
        self.scale_dtype = scale_dtype
        self.backend: str | None = None  # None: follow hf_littlebit.backends' default
        self._sign_cache: dict[tuple, tuple] = {}
        for prefix in self.path_prefixes:
            shapes = {
                "u_bits": ((out_features, packed_width(rank)), torch.int32),
                "v_bits": ((rank, packed_width(in_features)), torch.int32),
                "h": ((out_features,), scale_dtype),
                "l": ((rank,), scale_dtype),
                "g": ((in_features,), scale_dtype),
            }
            for name, (shape, dtype) in shapes.items():
                tensor = torch.zeros(shape, dtype=dtype, device=device)
                self.register_parameter(prefix + name, nn.Parameter(tensor, requires_grad=False))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if with_fp_weight:
            placeholder = torch.empty(out_features, in_features, dtype=weight_dtype, device="meta")
            self.weight = nn.Parameter(placeholder, requires_grad=False)

    # ------------------------------------------------------------------ structure
    @property
    def path_prefixes(self) -> tuple[str, ...]:
        return PATH_PREFIXES if self.residual else PATH_PREFIXES[:1]

    @property
    def is_packed(self) -> bool:
        """True once the layer holds real packed factors (no pending fp weight, nothing on meta)."""
        return "weight" not in self._parameters and not any(
            getattr(self, p + n).is_meta for p in self.path_prefixes for n in PATH_TENSORS
        )

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name → (shape, dtype) of every packed tensor, as a checkpoint of this layer must hold them."""
        out = {}
        for prefix in self.path_prefixes:
            for name in PATH_TENSORS:
                t = getattr(self, prefix + name)
                out[prefix + name] = (tuple(t.shape), t.dtype)
        return out

    def stored_bits(self) -> int:
        """Bits of the packed factors and scales (no bias), from the tensors actually held."""
        bits = 0
        for prefix in self.path_prefixes:
            for name in PATH_TENSORS:
                t = getattr(self, prefix + name)
                bits += t.numel() * t.element_size() * 8
        return bits

    def formula_bits(self) -> int:
        """Same quantity from the shape formula of :mod:`hf_littlebit.budget` (a cross-check)."""
        scale_bits = torch.finfo(self.scale_dtype).bits
        return stored_bits(self.in_features, self.out_features, self.rank, self.residual, scale_bits)

    # ------------------------------------------------------------------ filling
    @torch.no_grad()
    def set_factors_(self, paths: list[FactorPath]) -> None:
        """Pack factoriser output into this layer (on the paths' device) and drop the fp placeholder."""
        if len(paths) != len(self.path_prefixes):
            raise ValueError(f"expected {len(self.path_prefixes)} factor paths, got {len(paths)}")
        for prefix, path in zip(self.path_prefixes, paths, strict=False):
            if path.u.shape != (self.out_features, self.rank) or path.v.shape != (self.rank, self.in_features):
                raise ValueError(
                    f"factor shapes {tuple(path.u.shape)} / {tuple(path.v.shape)} do not match the layer "
                    f"({self.out_features}×{self.rank} / {self.rank}×{self.in_features})"
                )
            values = {
                "u_bits": pack_signs(path.u),
                "v_bits": pack_signs(path.v),
                "h": path.h.to(self.scale_dtype),
                "l": path.l.to(self.scale_dtype),
                "g": path.g.to(self.scale_dtype),
            }
            for name, value in values.items():
                param = nn.Parameter(value.contiguous(), requires_grad=False)
                param._is_hf_initialized = True  # tell Transformers not to re-initialise it
                self.register_parameter(prefix + name, param)
        if "weight" in self._parameters:
            del self.weight
        self._sign_cache.clear()

    def factor_paths(self, dtype: torch.dtype = torch.float32) -> list[FactorPath]:
        """The stored paths with ±1 factors unpacked (as ``FactorPath`` with sign-valued latents)."""
        paths = []
        for prefix in self.path_prefixes:
            u, v = self.signs(prefix, self.h.device, dtype)
            paths.append(
                FactorPath(u=u, v=v, h=getattr(self, prefix + "h"), l=getattr(self, prefix + "l"),
                           g=getattr(self, prefix + "g"))
            )
        return paths

    def signs(self, prefix: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """±1 factors of one path, unpacked once per (device, dtype) and cached.

        The cache is keyed by the packed tensors' identity and version, so offloading hooks that swap the data,
        ``.to()`` moves or in-place loads invalidate it instead of serving stale signs.
        """
        u_bits, v_bits = getattr(self, prefix + "u_bits"), getattr(self, prefix + "v_bits")
        key = (prefix, device, dtype)
        stamp = (u_bits.data_ptr(), u_bits._version, v_bits.data_ptr(), v_bits._version)
        hit = self._sign_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        u = unpack_signs(u_bits.to(device), self.rank, dtype)
        v = unpack_signs(v_bits.to(device), self.in_features, dtype)
        self._sign_cache[key] = (stamp, u, v)
        return u, v

    def clear_cache(self) -> None:
        """Free the unpacked ±1 factors (they are rebuilt on the next forward)."""
        self._sign_cache.clear()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``Ŵ`` (d_out × d_in) represented by the packed factors."""
        return sum(p.reconstruct(dtype) for p in self.factor_paths(dtype))

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .backends import littlebit_forward

        return littlebit_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual={self.residual}, bias={self.bias is not None}, scale_dtype={self.scale_dtype}"
        )
