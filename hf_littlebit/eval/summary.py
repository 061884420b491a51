"""``summary(model)``: per-layer rank and bits, and totals for the converted layers and the whole model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from ..format.budget import paper_bpw
from ..nn.embedding import LittleBitEmbedding, LittleBitTiedHead
from ..nn.experts import FUSED_TO_LIST, LittleBitExperts, expert_group
from ..nn.group_embedding import GroupQuantEmbedding
from ..nn.layer import littlebit_layers


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rank: int
    paths: int
    bpw_target: float
    bpw_paper: float  # the paper's accounting (no padding)
    bpw_true: float  # signs incl. padding + every scale vector, as stored
    bytes: int  # packed factors + scales + bias, as stored
    kind: str = "linear"  # "embedding", or "embedding+head" when an LM head reuses its packed tensors
    # "binary" (the low-rank format), or e.g. "4-bit g64" for a group-quantized embedding (rank and paths 0)
    format: str = "binary"


@dataclass
class ExpertGroupReport:
    """One projection of one fused experts module (e.g. ``…mlp.experts.gate_up_layers``): E packed layers."""

    name: str
    experts: int
    in_features: int
    out_features: int
    rank_min: int
    rank_max: int
    bpw_true: float  # over the E experts together
    bytes: int


def expert_groups(layers: list[LayerReport]) -> list[ExpertGroupReport]:
    """The per-expert rows of ``layers`` gathered per experts module and projection, in order of appearance."""
    groups: dict[str, list[LayerReport]] = {}
    for r in layers:
        group = expert_group(r.name)
        if group is not None:
            groups.setdefault(group, []).append(r)
    out = []
    for name, rows in groups.items():
        dense = sum(r.in_features * r.out_features for r in rows)
        out.append(ExpertGroupReport(
            name=name, experts=len(rows), in_features=rows[0].in_features, out_features=rows[0].out_features,
            rank_min=min(r.rank for r in rows), rank_max=max(r.rank for r in rows),
            bpw_true=sum(r.bpw_true * r.in_features * r.out_features for r in rows) / dense,
            bytes=sum(r.bytes for r in rows),
        ))
    return out


@dataclass
class ModelSummary:
    """Printable report; ``to_dict()`` gives the same numbers for JSON."""

    layers: list[LayerReport] = field(default_factory=list)  # every packed layer, each expert's included
    experts: list[ExpertGroupReport] = field(default_factory=list)  # the expert layers gathered per module
    converted_params: int = 0  # weights of the dense layers that were replaced
    converted_bytes: int = 0
    bpw_target: float = 0.0
    bpw_paper: float = 0.0
    bpw_true: float = 0.0
    model_bytes: int = 0  # every parameter and buffer of the model as it is now
    model_bytes_fp16: int = 0  # the same model with dense fp16 layers and fp16 everything else
    model_bytes_quantized_fp16: int = 0  # packed layers as stored, every other float tensor at 16 bits
    # Parameters of the model before quantization (each converted layer counted as its dense weight and bias), and
    # the bits per parameter of the whole model as it is now (what save_pretrained writes): the number to compare
    # with other formats, next to bpw_true, which covers the converted layers only.
    model_params: int = 0
    bpw_whole_model: float = 0.0
    # Weight tensors (≥ 2-D) that stay dense although nothing asked for it: not nn.Linear (fused MoE experts,
    # Conv1D...), not an embedding, not in modules_to_not_convert. Name → number of parameters.
    unconverted: dict[str, int] = field(default_factory=dict)
    unconverted_share: float = 0.0  # their share of all parameters
    # whole_model=True: the embedding (and the LM head) are packed too, and bpw_target is the budget of
    # bpw_whole_model rather than of bpw_true.
    whole_model: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = f"{'layer':<48} {'shape':>13} {'rank':>5} {'paths':>5} {'target':>7} {'paper':>7} {'true':>7} {'KiB':>9}"
        lines = [head, "-" * len(head)]
        groups = {g.name: g for g in self.experts}
        for r in self.layers:
            group = expert_group(r.name)
            if group is None:
                shape = f"{r.out_features}x{r.in_features}"
                label = r.name if r.kind == "linear" else f"{r.name} [{r.kind}]"
                binary = r.format == "binary"
                label = label if binary else f"{label[:-1]}, {r.format}]"
                rank, paths = (r.rank, r.paths) if binary else ("-", "-")
                lines.append(
                    f"{label[-48:]:<48} {shape:>13} {rank:>5} {paths:>5} {r.bpw_target:>7.3f} "
                    f"{r.bpw_paper:>7.3f} {r.bpw_true:>7.3f} {r.bytes / 1024:>9.1f}"
                )
            elif group in groups:  # one row per experts projection: E x shape, rank range, true bpw of all E
                g = groups.pop(group)
                shape = f"{g.experts}x{g.out_features}x{g.in_features}"
                rank = str(g.rank_min) if g.rank_min == g.rank_max else f"{g.rank_min}-{g.rank_max}"
                lines.append(
                    f"{g.name[-48:]:<48} {shape:>13} {rank:>5} {r.paths:>5} {r.bpw_target:>7.3f} {'':>7} "
                    f"{g.bpw_true:>7.3f} {g.bytes / 1024:>9.1f}"
                )
        lines.append("-" * len(head))
        n_experts = sum(g.experts for g in self.experts)
        label = f"converted layers ({len(self.layers)}" + (f", {n_experts} of them experts)" if n_experts else ")")
        lines.append(
            f"{label:<48} {self.converted_params:>13,} {'':>5} {'':>5} "
            f"{self.bpw_target:>7.3f} {self.bpw_paper:>7.3f} {self.bpw_true:>7.3f} {self.converted_bytes / 1024:>9.1f}"
        )
        ratio = self.model_bytes_fp16 / self.model_bytes if self.model_bytes else float("nan")
        scope = ("embedding and LM head packed, target " + f"{self.bpw_target:g}" if self.whole_model
                 else "embedding and LM head dense")
        lines.append(
            f"whole model ({scope}): {self.model_bytes / 2**20:.2f} MiB, {self.bpw_whole_model:.2f} bits per "
            f"parameter (dense fp16: {self.model_bytes_fp16 / 2**20:.2f} MiB, {ratio:.1f}x smaller)"
        )
        if self.unconverted:
            first = next(iter(self.unconverted))
            lines.append(f"not converted (dense): {len(self.unconverted)} weight tensors, "
                         f"{self.unconverted_share:.1%} of the parameters, e.g. {first}")
        return "\n".join(lines)


def unconverted_weights(model: nn.Module, converted: Iterable[str], skip: list[str]) -> dict[str, int]:
    """Weight tensors of two or more dimensions that stay dense without anyone asking: outside the ``converted``
    modules, outside embeddings, and not matched by ``skip`` (``modules_to_not_convert``). Name → parameter count.

    LittleBit converts ``nn.Linear`` only; this is what it would otherwise leave in full precision silently (the fused
    3-D experts of Transformers 5 MoE models, GPT-2's ``Conv1D``...)."""
    converted = set(converted)
    found = {}
    for module_name, module in model.named_modules():
        if module_name in converted or isinstance(module, nn.Embedding) or not should_convert_module(module_name, skip):
            continue
        placeholders = FUSED_TO_LIST if isinstance(module, LittleBitExperts) else ()  # being quantized on load
        for name, param in module.named_parameters(recurse=False):
            # per-expert biases are (E, d_out): two dimensions, still biases
            if param.dim() >= 2 and not name.endswith("bias") and name not in placeholders:
                found[f"{module_name}.{name}" if module_name else name] = param.numel()
    return found


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def summary(model: nn.Module) -> ModelSummary:
    """Ranks, target / paper / true bpw and bytes of every ``LittleBitLinear`` (and group-quantized embedding) in
    ``model``, plus totals."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    target = float(getattr(cfg, "bpw", float("nan")))
    report = ModelSummary(bpw_target=target)
    packed_ids = set()
    paper_bits = 0.0
    stored = 0
    layers = littlebit_layers(model)
    tied = {id(m.embedding) for m in model.modules() if isinstance(m, LittleBitTiedHead)}
    groups = {name: m for name, m in model.named_modules() if isinstance(m, GroupQuantEmbedding)}
    for name, layer in layers.items():
        dense = layer.in_features * layer.out_features
        bias_bytes = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
        bits = layer.stored_bits()
        report.layers.append(
            LayerReport(
                name=name, in_features=layer.in_features, out_features=layer.out_features, rank=layer.rank,
                paths=len(layer.path_prefixes), bpw_target=target,
                bpw_paper=paper_bpw(layer.in_features, layer.out_features, layer.rank, layer.residual),
                bpw_true=bits / dense, bytes=bits // 8 + bias_bytes,
                kind=("embedding+head" if id(layer) in tied else "embedding")
                if isinstance(layer, LittleBitEmbedding) else "linear",
            )
        )
        report.converted_params += dense
        report.converted_bytes += bits // 8 + bias_bytes
        paper_bits += report.layers[-1].bpw_paper * dense
        stored += bits
        packed_ids.update(id(p) for p in layer.parameters())
        report.model_bytes_fp16 += 2 * (dense + (layer.out_features if layer.bias is not None else 0))
        report.model_params += dense + (layer.out_features if layer.bias is not None else 0)
    for name, emb in groups.items():  # group-quantized embeddings (whole_model with embedding_bits)
        dense, bits = emb.num_embeddings * emb.embedding_dim, emb.stored_bits()
        report.layers.append(LayerReport(
            name=name, in_features=emb.embedding_dim, out_features=emb.num_embeddings, rank=0, paths=0,
            bpw_target=target, bpw_paper=bits / dense, bpw_true=bits / dense, bytes=bits // 8,
            kind="embedding+head" if id(emb) in tied else "embedding", format=f"{emb.bits}-bit g{emb.group_size}"))
        report.converted_params += dense
        report.converted_bytes += bits // 8
        paper_bits += bits
        stored += bits
        packed_ids.update(id(p) for p in emb.parameters())
        report.model_bytes_fp16 += 2 * dense
        report.model_params += dense
    report.experts = expert_groups(report.layers)
    if report.converted_params:
        report.bpw_paper = paper_bits / report.converted_params
        report.bpw_true = stored / report.converted_params
    total_params = 0  # of the model as it is now (the denominator of unconverted_share)
    for t in _unique_tensors(model):
        nbytes = t.numel() * t.element_size()
        report.model_bytes += nbytes
        if isinstance(t, nn.Parameter):
            total_params += t.numel()
        if id(t) not in packed_ids:
            as16 = 2 * t.numel() if t.is_floating_point() else nbytes
            report.model_bytes_fp16 += as16
            report.model_bytes_quantized_fp16 += as16
            if isinstance(t, nn.Parameter):
                report.model_params += t.numel()
        else:
            report.model_bytes_quantized_fp16 += nbytes
    if report.model_params:
        report.bpw_whole_model = 8 * report.model_bytes / report.model_params
    report.whole_model = any(r.kind != "linear" for r in report.layers)
    skip = list(getattr(cfg, "modules_to_not_convert", None) or [])
    report.unconverted = unconverted_weights(model, [*layers, *groups], skip)
    report.unconverted_share = sum(report.unconverted.values()) / total_params if total_params else 0.0
    return report
