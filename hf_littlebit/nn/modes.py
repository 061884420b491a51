"""Whole-model switches: packed (inference) ↔ trainable (QAT) mode, and the forward backend of every layer.

A littlebit model is *packed* after quantization or loading: ±1 factors as bits, fp16 scales, all frozen. For
quantization-aware training every ``LittleBitLinear`` goes to trainable mode (fp32 latent factors whose signs pass
through a sign estimator, fp32 scales), the LittleBit biases, norms and other small parameters train with them, and
the embeddings and LM head are frozen, as in LittleBit's QAT recipe (METHODS.md §2). :func:`pack` goes back.

Saving never needs the caller to pack: :func:`packed_state_dict` writes the packed format from a trainable model
without touching it, so checkpoints taken while training are ordinary littlebit folders.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..backends.dispatch import check_backend_name
from ..errors import LittleBitTrainingError
from .layer import littlebit_layers
from .trainable import LATENT_NAMES, SCALE_NAMES


def _config(model: nn.Module) -> Any:
    quantizer = getattr(model, "hf_quantizer", None)
    return getattr(quantizer, "quantization_config", None)


def is_trainable(model: nn.Module) -> bool:
    """True when at least one LittleBit layer of ``model`` is in trainable mode."""
    return any(layer.is_trainable for layer in littlebit_layers(model).values())


def frozen_embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Input embeddings and LM head (frozen during QAT: large, and not quantized)."""
    params: list[nn.Parameter] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            params.extend(module.parameters())
    return params


def make_trainable(
    model: nn.Module,
    estimator: str | None = None,
    alpha: float | None = None,
    clip: float = 1.0,
    freeze_embeddings: bool = True,
) -> nn.Module:
    """Put every packed LittleBit layer of ``model`` in trainable mode (in place) and return ``model``.

    Latents start from the stored signs, scaled into the estimator's sensitive band; scales start from their stored
    values. ``estimator``/``alpha`` default to the model's ``LittleBitConfig`` (``sign_estimator``,
    ``smoothsign_alpha``). LittleBit biases become trainable; with ``freeze_embeddings`` the input embeddings and
    LM head are frozen; every other parameter keeps its ``requires_grad``.
    """
    layers = littlebit_layers(model)
    if not layers:
        raise LittleBitTrainingError("make_trainable: the model holds no LittleBit layers; quantize it first")
    cfg = _config(model)
    estimator = estimator or getattr(cfg, "sign_estimator", None) or "smoothsign"
    alpha = alpha if alpha is not None else getattr(cfg, "smoothsign_alpha", 100.0)
    for layer in layers.values():
        if not layer.is_trainable:
            layer.make_trainable_(estimator=estimator, alpha=alpha, clip=clip)
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
    if freeze_embeddings:
        for p in frozen_embedding_params(model):
            p.requires_grad_(False)
    if cfg is not None:
        cfg.trainable = True
    return model


def pack(model: nn.Module) -> nn.Module:
    """Leave trainable mode everywhere: signs packed to bits, scales cast to storage dtype, layers frozen."""
    for name, layer in littlebit_layers(model).items():
        if layer.is_trainable:
            _check_unsharded(name, layer)
        layer.pack_()
        layer.requires_grad_(False)
    cfg = _config(model)
    if cfg is not None:
        cfg.trainable = False
    return model


@torch.no_grad()
def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every trainable layer's latents replaced by the packed format (model untouched)."""
    state = model.state_dict()
    for name, layer in littlebit_layers(model).items():
        if not layer.is_trainable:
            continue
        prefix = f"{name}." if name else ""
        for key in _trainable_names(layer):
            state.pop(prefix + key, None)
        with _full_parameters(layer):
            _check_unsharded(name, layer)
            state.update({prefix + k: v for k, v in layer.packed_tensors().items()})
    return state


@contextlib.contextmanager
def _full_parameters(layer: nn.Module) -> Iterator[None]:
    """Gather a layer's parameters when DeepSpeed ZeRO-3 has partitioned them (signs need the whole tensor)."""
    params = [p for p in layer.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # only reachable when DeepSpeed created the partitions

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _check_unsharded(name: str, layer: nn.Module) -> None:
    for prefix in layer.path_prefixes:
        latent = getattr(layer, prefix + "u_latent")
        if type(latent).__name__ == "DTensor" or tuple(latent.shape) != (layer.out_features, layer.rank):
            raise LittleBitTrainingError(
                f"cannot pack {name}: its latent factors are sharded ({type(latent).__name__} of shape "
                f"{tuple(latent.shape)}); save with a full state dict (FSDP: FULL_STATE_DICT; DeepSpeed ZeRO-3: "
                "stage3_gather_16bit_weights_on_model_save) or gather the parameters before packing"
            )


def _trainable_names(layer: nn.Module) -> set[str]:
    return {prefix + n for prefix in layer.path_prefixes for n in (*LATENT_NAMES, *SCALE_NAMES)}


def install_model_methods(model: nn.Module) -> None:
    """``model.littlebit_pack()`` and ``model.littlebit_make_trainable(...)`` as bound methods of this instance."""
    model.littlebit_pack = types.MethodType(pack, model)
    model.littlebit_make_trainable = types.MethodType(make_trainable, model)


def set_backend(model: nn.Module, backend: str) -> int:
    """Set the backend of every LittleBit layer of ``model`` (``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``);
    returns how many layers were changed. Caches of the previous backend are freed. ``$LITTLEBIT_BACKEND`` still
    overrides it."""
    check_backend_name(backend, "set_backend")
    layers = littlebit_layers(model)
    for layer in layers.values():
        layer.backend = backend
        layer.clear_cache()
    return len(layers)
