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

**Trainable mode** (:meth:`LittleBitLinear.make_trainable_`, used by block reconstruction and QAT): the packed signs
are replaced by fp32 *latent* factors ``u_latent`` (d_out × r) and ``v_latent`` (r × d_in) whose signs are taken in
the forward by a straight-through estimator (:mod:`hf_littlebit.estimators`), and ``h, l, g`` become trainable fp32
parameters. :meth:`LittleBitLinear.pack_` turns the layer back into the packed format above; nothing but the packed
format is ever saved.

The forward is ``Y = ((((X ⊙ g) sgn(V)ᵀ) ⊙ l) sgn(U)ᵀ) ⊙ h (+ residual path) + bias``; which implementation runs
is chosen by :mod:`hf_littlebit.backends`. The layer knows nothing of how the factors were found.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .budget import stored_bits
from .estimators import sign_estimator
from .factorize import FactorPath
from .packing import pack_signs, packed_width, unpack_signs

PATH_PREFIXES = ("", "res_")
PATH_TENSORS = ("u_bits", "v_bits", "h", "l", "g")
SCALE_NAMES = ("h", "l", "g")
LATENT_NAMES = ("u_latent", "v_latent")


def _version(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors (made under ``torch.inference_mode``) have none."""
    return 0 if t.is_inference() else t._version


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
        self.sign_estimator: str | None = None  # set in trainable mode
        self._sign_fn = None
        self._alpha, self._clip = 100.0, 1.0
        # Runtime switch (trainable mode): QAT may train the main path alone first and enable the residual later.
        self.residual_enabled = True
        self._sign_cache: dict[tuple, tuple] = {}
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
        """Same quantity from the shape formula of :mod:`hf_littlebit.budget` (a cross-check)."""
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
        return self._cached((prefix, device, dtype), [u_bits, v_bits], lambda: (
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
        return self._cached(("folded", prefixes, device, dtype), tensors, build)

    def _cached(self, key: tuple, sources: list[torch.Tensor], build: Callable[[], Any]) -> Any:
        """``build()``, kept in the cache under ``key`` and stamped with the identity and in-place version of each
        of ``sources``: a swapped, moved or edited source rebuilds it instead of serving a stale value."""
        stamp = tuple((t.data_ptr(), _version(t)) for t in sources)
        hit = self._sign_cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, build())
            self._sign_cache[key] = hit
        return hit[1]

    def clear_cache(self) -> None:
        """Free the unpacked ±1 factors (they are rebuilt on the next forward)."""
        self._sign_cache.clear()

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``Ŵ`` (d_out × d_in) represented by the packed factors."""
        return sum(p.reconstruct(dtype) for p in self.factor_paths(dtype))

    # ------------------------------------------------------------------ trainable mode
    @torch.no_grad()
    def make_trainable_(
        self,
        paths: list[FactorPath] | None = None,
        estimator: str = "smoothsign",
        alpha: float = 100.0,
        clip: float = 1.0,
    ) -> None:
        """Switch to latent fp32 factors and trainable fp32 scales.

        ``paths`` (from a factoriser, with continuous latents) seed the latents; without them the latents are the
        stored signs times ``1/alpha`` (SmoothSign's sensitive band) or ``clip/2`` (STE), so every entry can flip.
        """
        sign_fn = sign_estimator(estimator, alpha=alpha, clip=clip)
        if self.is_trainable:
            raise ValueError("make_trainable_: the layer is already in trainable mode")
        self._alpha, self._clip = alpha, clip
        if paths is None:
            if not self.is_packed:
                raise ValueError("make_trainable_: the layer holds no packed factors and no paths were given")
            magnitude = self._latent_magnitude(estimator, alpha, clip)
            paths = [FactorPath(p.u * magnitude, p.v * magnitude, p.h, p.l, p.g) for p in self.factor_paths()]
        if len(paths) != len(self.path_prefixes):
            raise ValueError(f"expected {len(self.path_prefixes)} factor paths, got {len(paths)}")
        device = self.h.device if not self.h.is_meta else paths[0].u.device
        for prefix, path in zip(self.path_prefixes, paths, strict=True):
            self._check_path_shapes(path)
            for name in ("u_bits", "v_bits"):
                self._parameters.pop(prefix + name, None)
            tensors = {"u_latent": path.u, "v_latent": path.v, "h": path.h, "l": path.l, "g": path.g}
            for name, value in tensors.items():
                param = nn.Parameter(value.detach().to(device=device, dtype=torch.float32).clone())
                param._is_hf_initialized = True
                self.register_parameter(prefix + name, param)
        if "weight" in self._parameters:
            del self.weight
        self.sign_estimator = estimator
        self._sign_fn = sign_fn
        self._sign_cache.clear()

    def latent_signs(self, prefix: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """±1 factors of one path in trainable mode, differentiable through the sign estimator.

        Frozen latents (e.g. the end-to-end calibration phase, which tunes scales only) have constant signs: those
        are taken once and cached, stamped like :meth:`signs`, instead of on every forward.
        """
        return self._latent_sign(prefix + "u_latent", dtype), self._latent_sign(prefix + "v_latent", dtype)

    def _latent_sign(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        latent = getattr(self, name)
        if latent.requires_grad:
            return self._sign_fn(latent).to(dtype)
        return self._cached(("latent", name, latent.device, dtype), [latent],
                            lambda: self._sign_fn(latent.detach()).to(dtype))

    @torch.no_grad()
    def pack_(self) -> None:
        """Leave trainable mode: pack the latents' signs, cast the scales to their storage dtype, freeze."""
        if not self.is_trainable:
            return
        packed = self.packed_tensors()
        for prefix in self.path_prefixes:
            for name in (*LATENT_NAMES, *SCALE_NAMES):
                del self._parameters[prefix + name]
        self.sign_estimator = None
        self._sign_fn = None
        self.residual_enabled = True
        for name, value in packed.items():
            param = nn.Parameter(value.contiguous(), requires_grad=False)
            param._is_hf_initialized = True
            self.register_parameter(name, param)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._sign_cache.clear()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A trainable layer also accepts the packed format (e.g. a Trainer checkpoint written while training):
        its latents restart from the stored signs, as :meth:`make_trainable_` does, and its scales load as saved."""
        if self.is_trainable and f"{prefix}u_bits" in state_dict and f"{prefix}u_latent" not in state_dict:
            expected = self.expected_tensors()
            packed = {name: state_dict.pop(prefix + name) for name in expected if prefix + name in state_dict}
            if len(packed) == len(expected):
                for name, value in packed.items():
                    if tuple(value.shape) != expected[name][0]:
                        error_msgs.append(f"{prefix + name}: packed shape {tuple(value.shape)} does not match the "
                                          f"layer's {expected[name][0]}")
                        return
                self._load_packed_into_latents(packed)
                for prefix_ in self.path_prefixes:  # now already in place; let the default loader see them
                    for name in (*LATENT_NAMES, *SCALE_NAMES):
                        state_dict[prefix + prefix_ + name] = getattr(self, prefix_ + name).detach()
            else:
                missing_keys.extend(prefix + n for n in expected if n not in packed)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _load_packed_into_latents(self, packed: dict[str, torch.Tensor]) -> None:
        magnitude = self._latent_magnitude(self.sign_estimator, self._alpha, self._clip)
        device = self.h.device
        for prefix in self.path_prefixes:
            u = unpack_signs(packed[prefix + "u_bits"].to(device), self.rank, torch.float32)
            v = unpack_signs(packed[prefix + "v_bits"].to(device), self.in_features, torch.float32)
            getattr(self, prefix + "u_latent").copy_(u * magnitude)
            getattr(self, prefix + "v_latent").copy_(v * magnitude)
            for name in SCALE_NAMES:
                getattr(self, prefix + name).copy_(packed[prefix + name].float())

    @staticmethod
    def _latent_magnitude(estimator: str, alpha: float, clip: float) -> float:
        """Size of latents seeded from signs: inside the estimator's sensitive band, so every entry can flip."""
        if estimator == "smoothsign":
            return 1.0 / alpha
        return 0.5 * clip if math.isfinite(clip) else 0.01

    def path_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each path's output (no bias) for input ``x``: e.g. to measure the residual path's share of the output."""
        from .backends import path_forward

        xs = x.reshape(-1, self.in_features).float()
        return [path_forward(self, prefix, xs, torch.float32) for prefix in self.path_prefixes]

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .backends import littlebit_forward

        return littlebit_forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual={self.residual}, bias={self.bias is not None}, scale_dtype={self.scale_dtype}"
            + (f", trainable={self.sign_estimator}" if self.is_trainable else "")
        )
