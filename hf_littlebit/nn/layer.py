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

**Trainable mode** (:class:`~hf_littlebit.nn.trainable.TrainableFactors`, used by block reconstruction and QAT):
the packed signs are replaced by fp32 latent factors whose signs go through a straight-through estimator; nothing
but the packed format is ever saved.

The forward is ``Y = ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h (+ residual path) + bias``; which implementation runs
is chosen by :mod:`hf_littlebit.backends.dispatch`, which sees the layer only through its attributes. The layer
knows nothing of how the factors were found, nor of Transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..backends.dispatch import littlebit_forward
from ..backends.reference import path_forward
from ..factorize.base import FactorPath
from ..format.budget import stored_bits
from ..format.packing import pack_signs, packed_width, unpack_signs
from .cache import StampedCache
from .trainable import LATENT_NAMES, SCALE_NAMES, TrainableFactors

__all__ = ["LATENT_NAMES", "PATH_PREFIXES", "PATH_TENSORS", "SCALE_NAMES", "LittleBitLinear", "littlebit_layers"]

PATH_PREFIXES = ("", "res_")
PATH_TENSORS = ("u_bits", "v_bits", "h", "l", "g")


class LittleBitLinear(TrainableFactors, nn.Module):
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
        # Splits of the Triton decode kernels' stage 1 (None: $LITTLEBIT_SPLIT_K, else chosen from the GPU's size).
        self.split_k: int | None = None
        self.sign_estimator: str | None = None  # set in trainable mode
        self._sign_fn = None
        self._alpha, self._clip = 100.0, 1.0
        # Runtime switch (trainable mode): QAT may train the main path alone first and enable the residual later.
        self.residual_enabled = True
        self._sign_cache = StampedCache()  # unpacked signs, folded factors, frozen latents' signs
        for name, (shape, dtype) in self.expected_tensors().items():
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
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
    def active_prefixes(self) -> tuple[str, ...]:
        """The paths the forward uses: the residual one only while ``residual_enabled`` (QAT may switch it off)."""
        return self.path_prefixes if self.residual_enabled else self.path_prefixes[:1]

    @property
    def is_packed(self) -> bool:
        """True once the layer holds real packed factors (no pending fp weight, not trainable, nothing on meta)."""
        if "weight" in self._parameters or self.is_trainable:
            return False
        return not any(self._parameters[name].is_meta for name in self.expected_tensors())

    @property
    def is_trainable(self) -> bool:
        """True between :meth:`make_trainable_` and :meth:`pack_` (latent factors instead of packed signs)."""
        return self.sign_estimator is not None

    def expected_tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name → (shape, dtype) of every packed tensor, as a checkpoint of this layer must hold them."""
        out = {}
        for prefix in self.path_prefixes:
            out[prefix + "u_bits"] = ((self.out_features, packed_width(self.rank)), torch.int32)
            out[prefix + "v_bits"] = ((self.rank, packed_width(self.in_features)), torch.int32)
            out[prefix + "h"] = ((self.out_features,), self.scale_dtype)
            out[prefix + "l"] = ((self.rank,), self.scale_dtype)
            out[prefix + "g"] = ((self.in_features,), self.scale_dtype)
        return out

    def stored_bits(self) -> int:
        """Bits of the packed factors and scales (no bias) as the packed format stores them."""
        bits = 0
        for shape, dtype in self.expected_tensors().values():
            bits += math.prod(shape) * (torch.iinfo(dtype).bits if dtype == torch.int32 else torch.finfo(dtype).bits)
        return bits

    def formula_bits(self) -> int:
        """Same quantity from the shape formula of :mod:`hf_littlebit.format.budget` (a cross-check)."""
        scale_bits = torch.finfo(self.scale_dtype).bits
        return stored_bits(self.in_features, self.out_features, self.rank, self.residual, scale_bits)

    # ------------------------------------------------------------------ filling
    @torch.no_grad()
    def set_factors_(self, paths: list[FactorPath]) -> None:
        """Pack factoriser output into this layer (on the paths' device) and drop the fp placeholder."""
        if self.is_trainable:
            raise ValueError("set_factors_: the layer is in trainable mode; call pack_() first")
        for name, value in self.packed_tensors(paths).items():
            param = nn.Parameter(value.contiguous(), requires_grad=False)
            param._is_hf_initialized = True  # tell Transformers not to re-initialise it
            self.register_parameter(name, param)
        if "weight" in self._parameters:
            del self.weight
        self._sign_cache.clear()

    @torch.no_grad()
    def packed_tensors(self, paths: list[FactorPath] | None = None) -> dict[str, torch.Tensor]:
        """The packed format's tensors (name → value) of ``paths``, or of the layer's own current factors.

        Does not modify the layer: a trainable layer is saved through this while it keeps training.
        """
        if paths is None:
            paths = [p.with_scale_dtype(self.scale_dtype, name=type(self).__name__) for p in self.factor_paths()]
        if len(paths) != len(self.path_prefixes):
            raise ValueError(f"expected {len(self.path_prefixes)} factor paths, got {len(paths)}")
        out = {}
        for prefix, path in zip(self.path_prefixes, paths, strict=True):
            self._check_path_shapes(path)
            out[prefix + "u_bits"] = pack_signs(path.u)
            out[prefix + "v_bits"] = pack_signs(path.v)
            for name in SCALE_NAMES:
                out[prefix + name] = getattr(path, name).detach().to(self.scale_dtype)
        return out

    def _check_path_shapes(self, path: FactorPath) -> None:
        if path.u.shape != (self.out_features, self.rank) or path.v.shape != (self.rank, self.in_features):
            raise ValueError(
                f"factor shapes {tuple(path.u.shape)} / {tuple(path.v.shape)} do not match the layer "
                f"({self.out_features}×{self.rank} / {self.rank}×{self.in_features})"
            )

    def factor_paths(self, dtype: torch.dtype = torch.float32) -> list[FactorPath]:
        """The stored paths with ±1 factors unpacked (as ``FactorPath`` with sign-valued latents).

        In trainable mode the paths carry the (detached) latent factors instead; their signs are the same thing.
        """
        if self.is_trainable:
            return [
                FactorPath(*(getattr(self, prefix + n).detach() for n in (*LATENT_NAMES, *SCALE_NAMES)))
                for prefix in self.path_prefixes
            ]
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
        return self._sign_cache.get((prefix, device, dtype), [u_bits, v_bits], lambda: (
            unpack_signs(u_bits.to(device), self.rank, dtype),
            unpack_signs(v_bits.to(device), self.in_features, dtype),
        ))

    def folded_factors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``Ŵ = B A``: ``A`` stacks ``S_V diag(g)`` of the active paths (Σr × d_in), ``B`` puts
        ``diag(h) S_U diag(l)`` side by side (d_out × Σr).

        The PyTorch path then costs two dense matmuls per call instead of two per path plus five scalings, which is
        what decides its speed for few tokens. Built in fp32, stored in ``dtype``, cached per (device, dtype) and
        stamped with every packed tensor's identity and version, like :meth:`signs`.
        """
        prefixes = self.active_prefixes

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            a_parts, b_parts = [], []
            for prefix in prefixes:
                # Unpacked here rather than through signs(): that would keep a second, unfolded fp32 copy cached.
                u = unpack_signs(getattr(self, prefix + "u_bits").to(device), self.rank)
                v = unpack_signs(getattr(self, prefix + "v_bits").to(device), self.in_features)
                h, l, g = (getattr(self, prefix + n).to(device=device, dtype=torch.float32) for n in SCALE_NAMES)
                a_parts.append(v * g)
                b_parts.append(u * l * h[:, None])
            return (torch.cat(a_parts, dim=0).to(dtype).contiguous(),
                    torch.cat(b_parts, dim=1).to(dtype).contiguous())

        tensors = [getattr(self, prefix + name) for prefix in prefixes for name in PATH_TENSORS]
        return self._sign_cache.get(("folded", prefixes, device, dtype), tensors, build)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        """``.to()``, ``.cuda()``, ``.half()``...: tensors derived on the old device or dtype must not outlive it."""
        self._sign_cache.clear()
        return super()._apply(fn, recurse)

    def clear_cache(self) -> None:
        """Free the unpacked ±1 factors (they are rebuilt on the next forward)."""
        self._sign_cache.clear()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``Ŵ`` (d_out × d_in) represented by the packed factors."""
        return sum(p.reconstruct(dtype) for p in self.factor_paths(dtype))

    def path_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each path's output (no bias) for input ``x``: e.g. to measure the residual path's share of the output."""
        xs = x.reshape(-1, self.in_features).float()
        return [path_forward(self, prefix, xs, torch.float32) for prefix in self.path_prefixes]

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return littlebit_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual={self.residual}, bias={self.bias is not None}, scale_dtype={self.scale_dtype}"
            + (f", trainable={self.sign_estimator}" if self.is_trainable else "")
        )


def littlebit_layers(model: nn.Module) -> dict[str, LittleBitLinear]:
    """Every ``LittleBitLinear`` of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LittleBitLinear)}
