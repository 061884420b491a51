"""Mixture-of-experts: a fused experts module split into one linear layer per expert matrix.

Transformers 5 keeps the routed experts of an MoE block as fused 3-D parameters in one ``…Experts`` module
(``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); gpt-oss stores them transposed, with per-expert biases). Its
forward is chosen at call time among ``experts_implementation`` functions (``eager``, ``grouped_mm``,
``batched_mm``, ``deepgemm``, ``sonicmoe``...), every one of which reads those dense tensors.

**Design.** Each fused module is *split*: its class is swapped for a subclass that mixes
:class:`LittleBitExperts` in front of the architecture's own class, and every fused parameter is replaced by a
``ModuleList`` with one ``(d_out, d_in)`` linear layer per expert (``gate_up_proj`` → ``gate_up_layers``,
``up_proj`` → ``up_layers``, ``down_proj`` → ``down_layers``). The layers are ``nn.Linear`` while the weights are
still full precision and :class:`~hf_littlebit.nn.layer.LittleBitLinear` once packed. Why this and not a packed
tensor subclass handled through ``__torch_function__``:

* every expert becomes an ordinary LittleBit layer, so the format, the backends (reference, CPU kernel, Triton),
  trainable mode (QAT, block reconstruction), the global allocator (one spectrum and one rank per expert), the
  checkpoint checks, ``summary`` and ``dequantize`` apply to experts unchanged — nothing is duplicated;
* ranks may differ between experts (the allocator gives each its own); one stacked tensor could not hold that
  without padding every expert to the largest rank;
* the forward is ours and explicit (loop over the experts that received tokens), instead of depending on which
  ``F.linear`` / ``bmm`` / ``grouped_mm`` / custom-kernel call each ``experts_implementation`` happens to make on a
  tensor subclass — the custom kernels (deepgemm, sonicmoe) read raw storage and would bypass it silently;
* the subclass keeps everything else of the architecture: its ``_apply_gate`` (gpt-oss's clamped, interleaved
  SwiGLU; the default ``act(gate) * up``), ``act_fn``, biases, ``post_expert_norm`` and the layout flags that
  Transformers' ``use_experts_implementation`` decorator sets (``has_gate``, ``has_bias``, ``is_transposed``).
  Routing stays in the MoE block, untouched.

``experts_implementation`` ``eager``, ``grouped_mm`` and ``batched_mm`` compute the same function from the dense
tensors; after the split this module's loop computes it (with the packed layers). Any other implementation (custom
kernels) is refused with :class:`~hf_littlebit.errors.LittleBitQuantizationError` at the first forward, never
silently replaced. Knows nothing of Transformers beyond that decorator's attribute names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import LittleBitQuantizationError

__all__ = ["EXPERT_LAYER", "FUSED_TO_LIST", "SAME_MATH_IMPLEMENTATIONS", "LittleBitExperts", "expert_group",
           "expert_weight", "is_fused_experts", "merge_experts_", "split_experts_"]

# Fused parameter → the ModuleList that replaces it (one layer per expert).
FUSED_TO_LIST = {"gate_up_proj": "gate_up_layers", "up_proj": "up_layers", "down_proj": "down_layers"}
# Name of one expert's layer: <experts module>.<list>.<index>
EXPERT_LAYER = re.compile(r"^(?P<module>.+)\.(?P<list>" + "|".join(FUSED_TO_LIST.values()) + r")\.(?P<index>\d+)$")


def expert_group(layer_name: str) -> str | None:
    """``"<experts>.gate_up_layers"`` for an expert layer's name, ``None`` for any other layer."""
    match = EXPERT_LAYER.match(layer_name)
    return f"{match['module']}.{match['list']}" if match else None


# experts_implementation values whose function is the eager one (the packed loop computes it); None: standalone use.
SAME_MATH_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm")


def is_fused_experts(module: nn.Module) -> bool:
    """A Transformers 5 experts module with fused 3-D weights, decorated by ``use_experts_implementation`` (whose
    layout flags the split forward relies on), or one already split."""
    if isinstance(module, LittleBitExperts):
        return True
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "_apply_gate")):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    params = module._parameters
    return all(isinstance(params.get(n), torch.Tensor) and params[n].dim() == 3 for n in (first, "down_proj"))


def expert_weight(fused: torch.Tensor, index: int, transposed: bool) -> torch.Tensor:
    """Expert ``index``'s ``(d_out, d_in)`` weight in a fused ``(E, d_out, d_in)`` tensor (``(E, d_in, d_out)`` when
    ``transposed``, as gpt-oss stores it): a view, no copy."""
    return fused[index].t() if transposed else fused[index]


class LittleBitExperts(nn.Module):
    """Mixed in front of an architecture's experts class once its fused weights are split into per-expert layers.

    The forward is the eager one of Transformers' experts modules (and of its ``batched_mm`` / ``grouped_mm``
    functions), with ``layers[e](x)`` where those read ``gate_up_proj[e]``: for each expert that received tokens,
    up projection (+ bias), the architecture's ``_apply_gate`` (or ``act_fn`` without a gate), down projection
    (+ bias), optional post-expert norm, routing weight, accumulation into the token's output.
    """

    @property
    def first_layers(self) -> nn.ModuleList:
        return self.gate_up_layers if self.has_gate else self.up_layers

    @property
    def num_split_experts(self) -> int:
        return len(self.down_layers)

    def expert_lists(self) -> dict[str, nn.ModuleList]:
        """Fused parameter name → its per-expert layer list."""
        return {fused: getattr(self, name) for fused, name in FUSED_TO_LIST.items() if name in self._modules}

    def _check_implementation(self) -> None:
        config = getattr(self, "config", None)
        impl = getattr(config, "_experts_implementation", None)
        if impl not in SAME_MATH_IMPLEMENTATIONS:
            raise LittleBitQuantizationError(
                f"{type(self).__name__}: experts_implementation={impl!r} reads the dense fused expert weights, which "
                "this LittleBit model no longer has (each expert is a packed layer). Use one of 'eager', "
                "'grouped_mm' or 'batched_mm' (all run the packed per-expert loop), e.g. "
                "model.set_experts_implementation('eager') or from_pretrained(..., experts_implementation='eager')"
            )

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self._check_implementation()
        out = torch.zeros_like(hidden_states)
        n_experts = self.num_split_experts
        with torch.no_grad():
            hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < n_experts]  # ≥ E: parallel sentinels
        first = self.first_layers
        first_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
        for e in hit:
            token_idx, top_k_pos = torch.where(top_k_index == e)
            y = first[e](hidden_states[token_idx])
            if first_bias is not None:
                y = y + first_bias[e]
            y = self._apply_gate(y) if self.has_gate else self.act_fn(y)
            y = self.down_layers[e](y)
            if self.has_bias:
                y = y + self.down_proj_bias[e]
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


_SPLIT_CLASSES: dict[type, type] = {}  # architecture's class → its split class


def split_class(cls: type) -> type:
    """``LittleBit<Cls>``: :class:`LittleBitExperts` in front of ``cls`` (made once per class, and registered in this
    module's namespace so that pickling finds it)."""
    if issubclass(cls, LittleBitExperts):
        return cls
    if cls not in _SPLIT_CLASSES:
        name = f"LittleBit{cls.__name__}"
        new = type(name, (LittleBitExperts, cls), {"__module__": __name__, "__qualname__": name})
        new._littlebit_original_class = cls
        _SPLIT_CLASSES[cls] = new
        globals()[name] = new
    return _SPLIT_CLASSES[cls]


LayerFactory = Callable[[str, int, int, int, "torch.Tensor | None"], nn.Module]


def split_experts_(module: nn.Module, make_layer: LayerFactory, keep_fused: bool = False) -> nn.Module:
    """Split a fused experts module in place: one layer per expert and fused parameter.

    ``make_layer(fused_name, expert, d_in, d_out, weight)`` builds each layer; ``weight`` is the expert's
    ``(d_out, d_in)`` view of the fused tensor (``None`` on the meta device). With ``keep_fused`` the fused
    parameters stay as they are (the quantize-on-load op needs them as targets for the checkpoint's tensors and
    deletes them once it has filled the layers); otherwise they are removed.
    """
    if isinstance(module, LittleBitExperts):
        raise ValueError(f"{type(module).__name__} is already split")
    lists = {}
    for fused_name, list_name in FUSED_TO_LIST.items():
        fused = module._parameters.get(fused_name)
        if fused is None:
            continue
        n, a, b = fused.shape
        d_out, d_in = (b, a) if module.is_transposed else (a, b)
        lists[list_name] = nn.ModuleList(
            make_layer(fused_name, e, d_in, d_out,
                       None if fused.is_meta else expert_weight(fused, e, module.is_transposed))
            for e in range(n)
        )
        if not keep_fused:
            del module._parameters[fused_name]
    module.__class__ = split_class(type(module))
    for list_name, layers in lists.items():
        module.add_module(list_name, layers)
    # The architecture's _init_weights would write the fused tensors, which are gone: nothing of ours to initialise.
    module._is_hf_initialized = True
    return module


def merge_experts_(module: LittleBitExperts, weight_of: Callable[[nn.Module], torch.Tensor]) -> nn.Module:
    """The inverse of :func:`split_experts_`: fused parameters rebuilt from ``weight_of(layer)`` (each expert's
    ``(d_out, d_in)`` weight) and the architecture's own class restored (e.g. to compare with the dense model)."""
    for fused_name, layers in module.expert_lists().items():
        stacked = torch.stack([weight_of(layer) for layer in layers])
        if module.is_transposed:
            stacked = stacked.transpose(1, 2)
        del module._modules[FUSED_TO_LIST[fused_name]]
        module.register_parameter(fused_name, nn.Parameter(stacked.contiguous(), requires_grad=False))
    module.__class__ = type(module)._littlebit_original_class
    return module
