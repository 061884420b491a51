"""Whole-model switches: packed (inference) ↔ trainable (QAT) mode, and the forward backend of every layer.

A littlebit model is *packed* after quantization or loading: ±1 factors as bits, fp16 scales, all frozen. For
quantization-aware training every ``LittleBitLinear`` goes to trainable mode (fp32 latent factors whose signs pass
through a sign estimator, fp32 scales), the LittleBit biases, norms and other small parameters train with them, and
the embeddings and LM head are frozen, as in LittleBit's QAT recipe (METHODS.md §2). :func:`pack` goes back.

A packed embedding or head (``whole_model``) is frozen the same way except for its scales: the ±1 factors of a
binary :class:`~hf_littlebit.nn.embedding.LittleBitEmbedding` (or untied packed head) and the codes of a
:class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding` are not trained, while their scale vectors — a few hundred
thousand numbers against tens of millions — train with the layers', as the calibration's end-to-end phase tunes
them (``embedding_scales=False`` freezes them too).

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
from .group_embedding import GroupQuantEmbedding
from .layer import LittleBitLinear, littlebit_layers
from .trainable import LATENT_NAMES, SCALE_NAMES


def _config(model: nn.Module) -> Any:
    quantizer = getattr(model, "hf_quantizer", None)
    return getattr(quantizer, "quantization_config", None)


def group_embeddings(model: nn.Module) -> list[GroupQuantEmbedding]:
    return [m for m in model.modules() if isinstance(m, GroupQuantEmbedding)]


def is_trainable(model: nn.Module) -> bool:
    """True when at least one LittleBit layer of ``model`` is in trainable mode (or a group-quantized embedding's
    scales are in their trainable fp32 form): saving then needs :func:`packed_state_dict`."""
    return (any(layer.is_trainable for layer in littlebit_layers(model).values())
            or any(emb.scales_tuned for emb in group_embeddings(model)))


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    modules = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            modules.append(module)
    return modules


def frozen_embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the input embeddings and LM head (frozen during QAT: large, and in LittleBit's recipe
    not quantized); :func:`embedding_scale_params` names the ones a packed embedding may still train."""
    return [p for module in _embedding_modules(model) for p in module.parameters()]


def embedding_scale_params(model: nn.Module) -> list[nn.Parameter]:
    """The scale tensors of a packed input embedding or LM head (``whole_model``): ``h, l, g`` of every path of a
    binary one in trainable mode, ``scales`` and ``zeros`` of a group-quantized one in its tuned form. Packed
    (frozen-format) ones have none to offer."""
    params: list[nn.Parameter] = []
    for module in _embedding_modules(model):
        if isinstance(module, LittleBitLinear) and module.is_trainable:
            params.extend(getattr(module, prefix + name) for prefix in module.path_prefixes for name in SCALE_NAMES)
        elif isinstance(module, GroupQuantEmbedding) and module.scales_tuned:
            params.extend((module.scales, module.zeros))
    return params


def freeze_embeddings_(model: nn.Module, keep_scales: bool = True) -> None:
    """Freeze the input embeddings and LM head; with ``keep_scales`` a packed one's scale tensors
    (:func:`embedding_scale_params`) keep their ``requires_grad`` (set by :func:`make_trainable`)."""
    keep = {id(p) for p in embedding_scale_params(model)} if keep_scales else set()
    for p in frozen_embedding_params(model):
        if id(p) not in keep:
            p.requires_grad_(False)


def make_trainable(
    model: nn.Module,
    estimator: str | None = None,
    alpha: float | None = None,
    clip: float = 1.0,
    freeze_embeddings: bool = True,
    embedding_scales: bool = True,
) -> nn.Module:
    """Put every packed LittleBit layer of ``model`` in trainable mode (in place) and return ``model``.

    Latents start from the stored signs, scaled into the estimator's sensitive band; scales start from their stored
    values. ``estimator``/``alpha`` default to the model's ``LittleBitConfig`` (``sign_estimator``,
    ``smoothsign_alpha``). LittleBit biases become trainable; with ``freeze_embeddings`` the input embeddings and
    LM head are frozen — except, with ``embedding_scales``, the scales of packed ones (``whole_model``: ``h, l, g``
    of a binary embedding or head, ``scales`` and ``zeros`` of a group-quantized embedding, its codes fixed); every
    other parameter keeps its ``requires_grad``.
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
    for embedding in group_embeddings(model):
        if embedding_scales and not embedding.scales_tuned:
            embedding.tune_scales_()
        elif not embedding_scales and embedding.scales_tuned:
            embedding.freeze_scales_()
    if freeze_embeddings:
        freeze_embeddings_(model, keep_scales=embedding_scales)
    if embedding_scales:  # also after an earlier embedding_scales=False, or anything else that froze them
        for p in embedding_scale_params(model):
            p.requires_grad_(True)
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
    for embedding in group_embeddings(model):
        embedding.freeze_scales_()
    cfg = _config(model)
    if cfg is not None:
        cfg.trainable = False
    return model


@torch.no_grad()
def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every trainable layer's latents replaced by the packed format, and tuned group
    embedding scales cast to their storage dtype (model untouched)."""
    state = model.state_dict()
    for name, embedding in model.named_modules():
        if isinstance(embedding, GroupQuantEmbedding) and embedding.scales_tuned:
            for key in (f"{name}.{k}" if name else k for k in ("scales", "zeros")):
                if key in state:
                    state[key] = state[key].to(embedding.scale_dtype)
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
