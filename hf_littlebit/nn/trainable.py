"""Trainable mode of the packed layer: fp32 latent factors whose signs pass through a sign estimator.

Block reconstruction and QAT need gradients where the packed format has bits. :meth:`TrainableFactors.make_trainable_`
replaces, per path, ``u_bits``/``v_bits`` by fp32 *latent* factors ``u_latent`` (d_out × r) and ``v_latent``
(r × d_in) whose signs are taken in the forward by a straight-through estimator (:mod:`hf_littlebit.nn.estimators`),
and turns ``h, l, g`` into trainable fp32 parameters. :meth:`TrainableFactors.pack_` goes back to the packed format;
a trainable layer also *loads* the packed format (a Trainer checkpoint written while training), so nothing but the
packed format is ever saved.

This is a mixin of :class:`~hf_littlebit.nn.layer.LittleBitLinear`: it uses the layer's structure (``path_prefixes``,
``expected_tensors``, ``factor_paths``, ``packed_tensors``, the stamped cache) and adds only the mode switch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..factorize.base import FactorPath
from ..format.packing import unpack_signs
from .estimators import sign_estimator

SCALE_NAMES = ("h", "l", "g")
LATENT_NAMES = ("u_latent", "v_latent")


class TrainableFactors:
    """The trainable-mode half of ``LittleBitLinear`` (see the module docstring)."""

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
        return self._sign_cache.get(("latent", name, latent.device, dtype), [latent],
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
