"""Calibrated block-wise reconstruction: quantize one transformer block at a time and fit it to its fp outputs.

For block ``i`` (in order):

1. its inputs ``X`` are the outputs of blocks ``0..i-1`` *as already quantized* (error propagation), for every
   calibration sequence; the targets are the full-precision *model's* activations after this block
   (``targets="fp_inputs"``, default: the block also learns to undo the error of the blocks before it), or the
   full-precision block's outputs on the same ``X`` (``targets="quantized_inputs"``);
2. each convertible ``nn.Linear`` of the block is factorised with the configured method and replaced by a
   :class:`~hf_littlebit.layer.LittleBitLinear` in trainable mode (latent factors, signs through a straight-through
   estimator, fp32 scales);
3. latents, scales (and optionally the block's norms) are optimised with Adam to minimise the block-output error
   (per-token normalised MSE by default), on minibatches of the calibration set;
4. the layers are packed (the fp weights are gone from the model), the block's outputs on ``X`` become the next
   block's inputs, and — with a work folder — the packed block and those inputs are written to disk so an interrupted
   run resumes at the next block.

Optionally (``e2e_steps``) an end-to-end phase follows: with the fp model's outputs of the last block kept from the
pass above, the scale vectors of every layer are tuned jointly on KL(fp ‖ quantized) of the next-token distributions
(:func:`tune_end_to_end`). A block fit sees only its own output error; this phase sees what the errors of all blocks
do together to the prediction.

Only one block's inputs and targets are held at once (in memory, or spilled to disk above a size limit). This module
drives modules and tensors; it knows the config's numbers, not the Transformers loading machinery.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from .activation_stats import InputSecondMoments
from .config import LittleBitConfig
from .integration import LayerPlan, factorize_for_layer, new_littlebit_layer
from .kl import token_kl
from .layer import LittleBitLinear

logger = logging.get_logger(__name__)

STATE_FILE = "progress.json"
WORK_FORMAT = 1


class ReconstructionError(RuntimeError):
    """The model or the work folder does not fit block-wise reconstruction."""


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


@dataclass
class BlockReport:
    """What happened to one block (also written to the work folder)."""

    index: int
    layers: int
    loss_before: float
    loss_after: float
    seconds: float
    delta_error_before: float = float("nan")  # ‖y − t‖² / ‖t − x‖²: error relative to the block's own contribution
    delta_error_after: float = float("nan")


@dataclass
class EndToEndReport:
    """The end-to-end phase: KL(fp ‖ quantized) per token on the first calibration batches, before and after."""

    steps: int
    kl_before: float
    kl_after: float
    seconds: float


@dataclass
class ReconstructionResult:
    blocks: list[BlockReport] = field(default_factory=list)
    resumed_from: int = 0
    outside_blocks: list[str] = field(default_factory=list)
    end_to_end: EndToEndReport | None = None

    def to_dict(self) -> dict:
        return {
            "blocks": [vars(b) for b in self.blocks],
            "resumed_from": self.resumed_from,
            "outside_blocks": self.outside_blocks,
            "end_to_end": vars(self.end_to_end) if self.end_to_end is not None else None,
        }


# ---------------------------------------------------------------------------------------------------- structure
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks: the ``ModuleList`` with ``num_hidden_layers`` entries."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    candidates = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and any(isinstance(x, nn.Linear | LittleBitLinear)
                                                                for x in m[0].modules())
    ]
    if n_layers is not None:
        exact = [c for c in candidates if len(c[1]) == n_layers]
        if exact:
            return exact[0]
    if not candidates:
        raise ReconstructionError(
            f"{type(model).__name__} has no list of transformer blocks; block-wise reconstruction needs a decoder "
            "with a ModuleList of layers (quantize without calibration instead)"
        )
    return max(candidates, key=lambda c: len(c[1]))


def block_output(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


# ---------------------------------------------------------------------------------------------------- activations
class ActivationStore:
    """One tensor per calibration batch, in memory or (``spill_dir``) as safetensors files on disk."""

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.spill_dir = spill_dir
        self._items: list[torch.Tensor | Path] = []
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if self.spill_dir is None:
            self._items.append(t)
            return
        path = self.spill_dir / f"batch_{len(self._items):05d}.safetensors"
        save_file({"x": t}, str(path))
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item if isinstance(item, torch.Tensor) else load_file(str(item))["x"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def save(self, folder: Path) -> None:
        """Write every batch to ``folder`` (atomically: a temporary folder renamed into place)."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, t in enumerate(self):
            save_file({"x": t}, str(tmp / f"batch_{i:05d}.safetensors"))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: Path, spill_dir: Path | None = None) -> ActivationStore:
        store = cls(spill_dir)
        for path in sorted(folder.glob("batch_*.safetensors")):
            store.append(load_file(str(path))["x"])
        return store

    def copy(self, spill_dir: Path | None = None) -> ActivationStore:
        """A store with the same tensors (shared in memory; re-written when spilling)."""
        other = ActivationStore(spill_dir)
        for t in self:
            other.append(t)
        return other

    def clear(self) -> None:
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
        self._items = []


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int, spill_dir: Path | None
) -> tuple[ActivationStore, list[dict[str, Any]]]:
    """Inputs of block 0 for every batch, and the keyword arguments (masks, rotary tables...) each block receives.

    Batch 0 runs the whole model once so that every block's arguments are seen (they differ between blocks in
    hybrid-attention models); the other batches stop at block 0. All batches have the same shape, so the arguments
    recorded on batch 0 are valid for every batch.
    """
    device = next(p.device for p in model.parameters() if not p.is_meta)
    store = ActivationStore(spill_dir)
    kwargs_per_block: list[dict[str, Any] | None] = [None] * len(blocks)
    state = {"full": True}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kw = dict(kwargs)
            hidden = kw.pop("hidden_states", None)
            if hidden is None:
                hidden = args[0]
            kw["past_key_values"] = None
            kw["use_cache"] = False
            if kwargs_per_block[index] is None:
                kwargs_per_block[index] = kw
            if index == 0:
                store.append(hidden)
                if not state["full"]:
                    raise _StopForward
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            state["full"] = start == 0
            try:
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in kwargs_per_block):
        raise ReconstructionError("some transformer blocks were not called in a forward pass; cannot calibrate them")
    return store, kwargs_per_block  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- loss
def block_loss(y: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``"token_normalized"``: mean over tokens of ‖y − t‖² / ‖t‖²; ``"mse"``: mean squared error."""
    diff = (y.float() - target.float()).pow(2)
    if kind == "mse":
        return diff.mean()
    return (diff.sum(-1) / target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def evaluate_block(
    block: nn.Module, inputs: ActivationStore, targets: ActivationStore, kwargs: dict, kind: str,
    device: torch.device, next_inputs: ActivationStore | None = None,
) -> tuple[float, float]:
    """Mean loss over all batches, and the error relative to the block's contribution ``‖y − t‖² / ‖t − x‖²``
    (the residual stream dominates ``‖t‖``, so the loss alone flatters a block). With ``next_inputs`` the outputs
    are also stored for the next block."""
    total = err = ref = 0.0
    for x, t in zip(inputs, targets, strict=True):
        x, t = x.to(device), t.to(device)
        y = block_output(block, x, kwargs)
        total += block_loss(y, t, kind).item()
        err += (y.float() - t.float()).pow(2).sum().item()
        ref += (t.float() - x.float()).pow(2).sum().item()
        if next_inputs is not None:
            next_inputs.append(y)
    return total / max(len(inputs), 1), err / max(ref, 1e-30)


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class ReconstructionOptions:
    """The knobs of the procedure (taken from :class:`LittleBitConfig`'s ``calibration_*`` fields)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    scale_lr: float = 1e-3
    tune_norms: bool = False
    norm_lr: float = 1e-4
    loss: str = "token_normalized"
    targets: str = "fp_inputs"
    estimator: str = "ste"
    alpha: float = 100.0
    max_activation_gib: float = 4.0
    e2e_steps: int = 0
    e2e_lr: float = 1e-2

    @property
    def tracks_fp(self) -> bool:
        """Whether the pass carries the fp model's activations along (as targets, or as the end-to-end teacher)."""
        return self.targets == "fp_inputs" or self.e2e_steps > 0

    @classmethod
    def from_config(cls, config: LittleBitConfig) -> ReconstructionOptions:
        return cls(
            steps=config.calibration_steps, batch_size=config.calibration_batch_size, lr=config.calibration_lr,
            scale_lr=config.calibration_scale_lr, tune_norms=config.calibration_tune_norms,
            loss=config.calibration_loss, targets=config.calibration_targets, estimator=config.sign_estimator,
            alpha=config.smoothsign_alpha, max_activation_gib=config.calibration_offload_gib,
            e2e_steps=config.calibration_e2e_steps, e2e_lr=config.calibration_e2e_lr,
        )


def _fingerprint(model: nn.Module, config: LittleBitConfig, tokens: torch.Tensor, opts: ReconstructionOptions) -> str:
    """Identifies the block-wise pass; the end-to-end phase's settings are left out, so a finished pass can be
    resumed with other end-to-end settings (only whether the fp activations are tracked matters)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in config.to_dict().items()
           if k not in ("calibration", "calibrated_with", "calibration_e2e_steps", "calibration_e2e_lr")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    passes = {k: v for k, v in vars(opts).items() if k not in ("e2e_steps", "e2e_lr")}
    h.update(json.dumps({**passes, "tracks_fp": opts.tracks_fp}, sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def _latent_param_groups(layers: list[LittleBitLinear], norms: list[nn.Parameter], opts: ReconstructionOptions,
                         scale_lr: float | None = None):
    """Adam groups of the trainable tensors, with learning rates proportional to each tensor's RMS (steps are
    relative); ``scale_lr`` overrides ``opts.scale_lr``."""
    scale_lr = opts.scale_lr if scale_lr is None else scale_lr
    groups = []
    for layer in layers:
        for name, p in layer.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            base = opts.lr if name.endswith("_latent") else scale_lr
            rms = p.detach().pow(2).mean().sqrt().item()
            groups.append({"params": [p], "lr": base * (rms if rms > 0 else 1.0)})
    if norms:
        groups.append({"params": norms, "lr": opts.norm_lr})
    return groups


def _norm_params(block: nn.Module) -> list[nn.Parameter]:
    """Weights of the block's normalisation layers (any module whose class name contains "Norm")."""
    return [p for m in block.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]


def _cosine_lr_(optimizer: torch.optim.Optimizer, step: int, steps: int) -> None:
    factor = 0.5 * (1 + math.cos(math.pi * step / steps))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _minibatch_indices(n: int, steps: int, seed: int) -> Iterator[int]:
    """``steps`` batch indices in ``range(n)``: seeded shuffles, one pass over the batches after another."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(n, generator=generator).tolist()
        yield order.pop()


def _adam(groups: list[dict]) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def optimise_block(
    block: nn.Module, layers: list[LittleBitLinear], inputs: ActivationStore, targets: ActivationStore,
    kwargs: dict, opts: ReconstructionOptions, seed: int, device: torch.device,
) -> None:
    """Adam on latents and scales (and norms) of one block for ``opts.steps`` minibatch steps, cosine schedule."""
    norms = _norm_params(block) if opts.tune_norms else []
    for p in norms:
        p.requires_grad_(True)
    optimizer = _adam(_latent_param_groups(layers, norms, opts))
    with torch.enable_grad():
        for step, i in enumerate(_minibatch_indices(len(inputs), opts.steps, seed)):
            _cosine_lr_(optimizer, step, opts.steps)
            y = block_output(block, inputs[i].to(device), kwargs)
            loss = block_loss(y, targets[i].to(device), opts.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in norms:
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- end to end
def next_token_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions."""
    return token_kl(logits, teacher_logits).mean()


class _AppendTeacher:
    """Forward hook on the last block: appends the fp model's output of that block along the batch axis.

    The model's head (final norm, ``lm_head``, soft-capping... whatever follows the blocks) then computes the
    teacher's logits in the same pass as the student's, without an fp copy of the model: only the fp hidden states
    after the last block are kept, and the head is not quantized.
    """

    def __init__(self) -> None:
        self.teacher: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.teacher is None:
            return None
        hidden = output[0] if isinstance(output, tuple | list) else output
        both = torch.cat([hidden, self.teacher.to(device=hidden.device, dtype=hidden.dtype)], dim=0)
        return (both, *output[1:]) if isinstance(output, tuple | list) else both


def _student_and_teacher_logits(model: nn.Module, hook: _AppendTeacher, ids: torch.Tensor, teacher: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    hook.teacher = teacher
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        hook.teacher = None
    return logits[: ids.shape[0]], logits[ids.shape[0]:].detach()


def tune_end_to_end(
    model: nn.Module, last_block: nn.Module, layers: list[LittleBitLinear], tokens: torch.Tensor,
    teacher_hidden: ActivationStore, opts: ReconstructionOptions, seed: int, progress: bool = True,
    eval_batches: int = 4,
) -> EndToEndReport:
    """Tune the scales of ``layers`` (packed on entry and on return) so the model's next-token distribution on
    ``tokens`` matches the teacher's, given the fp model's outputs of ``last_block`` for each batch of
    ``len(tokens) // len(teacher_hidden)`` sequences. Adam with per-tensor relative learning rates, cosine schedule;
    the ±1 factors stay fixed (the calibration set is too small to choose signs end to end without overfitting)."""
    t0 = time.perf_counter()
    device = next(p.device for p in model.parameters() if not p.is_meta)
    batch = tokens.shape[0] // len(teacher_hidden)
    batches = [tokens[i * batch:(i + 1) * batch].to(device) for i in range(len(teacher_hidden))]
    hook = _AppendTeacher()
    handle = last_block.register_forward_hook(hook)
    norms = _norm_params(model) if opts.tune_norms else []
    try:
        for layer in layers:
            layer.make_trainable_(estimator=opts.estimator, alpha=opts.alpha)
            for prefix in layer.path_prefixes:
                for name in ("u_latent", "v_latent"):
                    getattr(layer, prefix + name).requires_grad_(False)
        for p in norms:
            p.requires_grad_(True)

        @torch.no_grad()
        def measure() -> float:
            n = min(eval_batches, len(batches))
            return sum(next_token_kl(*_student_and_teacher_logits(model, hook, batches[i], teacher_hidden[i])).item()
                       for i in range(n)) / max(n, 1)

        before = measure()
        optimizer = _adam(_latent_param_groups(layers, norms, opts, scale_lr=opts.e2e_lr))
        bar = logging.tqdm(total=opts.e2e_steps, desc="LittleBit end-to-end", unit="step", disable=not progress)
        with torch.enable_grad():
            for step, i in enumerate(_minibatch_indices(len(batches), opts.e2e_steps, seed)):
                _cosine_lr_(optimizer, step, opts.e2e_steps)
                loss = next_token_kl(*_student_and_teacher_logits(model, hook, batches[i], teacher_hidden[i]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.set_postfix_str(f"KL {loss.item():.4g}")
                bar.update(1)
        bar.close()
        after = measure()
    finally:
        handle.remove()
        for p in norms:
            p.requires_grad_(False)
        for layer in layers:
            layer.pack_()
    report = EndToEndReport(opts.e2e_steps, before, after, time.perf_counter() - t0)
    logger.info(f"LittleBit end-to-end: KL {before:.4g} -> {after:.4g} ({report.seconds:.1f} s)")
    return report


class BlockReconstructor:
    """Runs the procedure of the module docstring over ``blocks`` of ``model``, with optional resume."""

    def __init__(
        self,
        model: nn.Module,
        config: LittleBitConfig,
        plans: list[LayerPlan],
        tokens: torch.Tensor,
        opts: ReconstructionOptions,
        work_dir: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.config = config
        self.plans = {p.name: p for p in plans}
        self.tokens = tokens
        self.opts = opts
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.resume = resume
        self.progress = progress
        self.blocks_name, self.blocks = find_blocks(model)
        self.device = next(p.device for p in model.parameters() if not p.is_meta)
        self._tmp_root: Path | None = None
        self.batch_size = max(d for d in range(1, min(opts.batch_size, tokens.shape[0]) + 1)
                              if tokens.shape[0] % d == 0)

    # ------------------------------------------------------------------ helpers
    def block_plans(self, index: int) -> list[LayerPlan]:
        prefix = f"{self.blocks_name}.{index}."
        return [p for name, p in self.plans.items() if name.startswith(prefix)]

    def outside_plans(self) -> list[LayerPlan]:
        prefix = f"{self.blocks_name}."
        return [p for name, p in self.plans.items() if not name.startswith(prefix)]

    def _spill_dir(self, name: str) -> Path | None:
        t = self.tokens
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", 0) or 0
        gib = t.numel() * hidden * 4 / 2**30
        if gib <= self.opts.max_activation_gib:
            return None
        if self.work_dir is not None:
            return self.work_dir / "spill" / name
        if self._tmp_root is None:
            self._tmp_root = Path(tempfile.mkdtemp(prefix="littlebit-activations-"))
        return self._tmp_root / name

    def _convert_block(self, index: int, trainable: bool,
                       importance: dict[str, torch.Tensor] | None = None) -> list[LittleBitLinear]:
        layers = []
        for plan in self.block_plans(index):
            dense = self.model.get_submodule(plan.name)
            layer = new_littlebit_layer(plan, self.config, dense, device=self.device)
            if trainable:
                paths = factorize_for_layer(dense.weight, plan, self.config,
                                            input_importance=(importance or {}).get(plan.name))
                layer.make_trainable_(paths, estimator=self.opts.estimator, alpha=self.opts.alpha)
            layers.append(layer)
            self.model.set_submodule(plan.name, layer)
        return layers

    # ------------------------------------------------------------------ resume state
    def _load_state(self, fingerprint: str) -> int:
        if self.work_dir is None or not self.resume:
            if self.work_dir is not None and (self.work_dir / STATE_FILE).exists():
                raise ReconstructionError(
                    f"{self.work_dir} already holds a reconstruction run; pass resume=True (--resume) to continue "
                    "it, or choose an empty work folder"
                )
            return 0
        state_path = self.work_dir / STATE_FILE
        if not state_path.exists():
            return 0
        state = json.loads(state_path.read_text())
        if state.get("format") != WORK_FORMAT or state.get("fingerprint") != fingerprint:
            raise ReconstructionError(
                f"{self.work_dir} belongs to a different run (model, config or calibration data differ); "
                "resume with the same settings, or use an empty work folder"
            )
        done = int(state["next_block"])
        for index in range(done):
            layers = self._convert_block(index, trainable=False)
            tensors = load_file(str(self.work_dir / "blocks" / f"block_{index:04d}.safetensors"))
            self.blocks[index].load_state_dict(tensors, strict=True, assign=False)
            for layer in layers:
                layer.requires_grad_(False)
        self.result.blocks = [BlockReport(**b) for b in state.get("reports", [])]
        return done

    def _save_state(self, index: int, inputs: ActivationStore, fp_inputs: ActivationStore | None,
                    fingerprint: str) -> None:
        if self.work_dir is None:
            return
        blocks_dir = self.work_dir / "blocks"
        blocks_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.blocks[index].state_dict().items()}
        tmp = blocks_dir / f"block_{index:04d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(blocks_dir / f"block_{index:04d}.safetensors")
        inputs.save(self.work_dir / "inputs")
        if fp_inputs is not None:
            fp_inputs.save(self.work_dir / "fp_inputs")
        state = {"format": WORK_FORMAT, "fingerprint": fingerprint, "next_block": index + 1,
                 "reports": [vars(b) for b in self.result.blocks]}
        tmp_state = self.work_dir / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state, indent=1))
        tmp_state.replace(self.work_dir / STATE_FILE)

    # ------------------------------------------------------------------ main loop
    def run(self) -> ReconstructionResult:
        self.result = ReconstructionResult()
        fingerprint = _fingerprint(self.model, self.config, self.tokens, self.opts)
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        start = self._load_state(fingerprint)
        self.result.resumed_from = start
        # On resume only one batch is run, for the blocks' arguments; the inputs come from the work folder.
        capture = self.tokens if start == 0 else self.tokens[: self.batch_size]
        inputs, kwargs = capture_block_inputs(
            self.model, self.blocks, capture, self.batch_size, self._spill_dir("inputs_0")
        )
        if start > 0:
            inputs.clear()
            inputs = ActivationStore.load(self.work_dir / "inputs", self._spill_dir(f"inputs_{start}"))
        fp_inputs = None
        if self.opts.tracks_fp:
            fp_inputs = (ActivationStore.load(self.work_dir / "fp_inputs", self._spill_dir(f"fp_inputs_{start}"))
                         if start > 0 else inputs.copy(self._spill_dir("fp_inputs_0")))
        bar = logging.tqdm(total=len(self.blocks), initial=start, desc="LittleBit calibrating", unit="block",
                           disable=not self.progress)
        try:
            for index in range(start, len(self.blocks)):
                inputs, fp_inputs = self._run_block(index, inputs, fp_inputs, kwargs[index], fingerprint, bar)
            bar.close()
            self._convert_outside_blocks()
            if self.opts.e2e_steps > 0 and fp_inputs is not None:
                layers = [self.model.get_submodule(name) for name in self.plans]
                self.result.end_to_end = tune_end_to_end(
                    self.model, self.blocks[-1], layers, self.tokens, fp_inputs, self.opts,
                    seed=self.config.seed * 1_000_003 + len(self.blocks), progress=self.progress,
                )
        finally:
            bar.close()
            inputs.clear()
            if fp_inputs is not None:
                fp_inputs.clear()
            if self._tmp_root is not None:
                shutil.rmtree(self._tmp_root, ignore_errors=True)
        return self.result

    def _convert_outside_blocks(self) -> None:
        """Layers outside the blocks (e.g. OPT's project_in/out) have no block to be calibrated in: data-free."""
        for plan in self.outside_plans():
            dense = self.model.get_submodule(plan.name)
            layer = new_littlebit_layer(plan, self.config, dense, device=dense.weight.device)
            layer.set_factors_(factorize_for_layer(dense.weight, plan, self.config))
            self.model.set_submodule(plan.name, layer)
            self.result.outside_blocks.append(plan.name)

    def _run_block(
        self, index: int, inputs: ActivationStore, fp_inputs: ActivationStore | None, kwargs: dict, fingerprint: str,
        bar,
    ) -> tuple[ActivationStore, ActivationStore | None]:
        t0 = time.perf_counter()
        block = self.blocks[index]
        targets = ActivationStore(self._spill_dir(f"targets_{index}"))
        # The fp block's pass that makes the targets also measures its layers' input statistics (activation-aware).
        watched = {p.name: self.model.get_submodule(p.name) for p in self.block_plans(index)} \
            if self.config.activation_aware else {}
        fp_targets = self.opts.targets == "fp_inputs"
        with torch.no_grad(), InputSecondMoments(watched) as stats:
            for x in (fp_inputs if fp_targets else inputs):
                targets.append(block_output(block, x.to(self.device), kwargs))
        fp_next = None  # the fp model's outputs of this block, when they are not the targets already
        if fp_inputs is not None and not fp_targets:
            fp_next = ActivationStore(self._spill_dir(f"fp_inputs_{index + 1}"))
            with torch.no_grad():
                for x in fp_inputs:
                    fp_next.append(block_output(block, x.to(self.device), kwargs))
        layers = self._convert_block(index, trainable=True, importance=stats.mean())
        before, delta_before = evaluate_block(block, inputs, targets, kwargs, self.opts.loss, self.device)
        if layers and self.opts.steps > 0:
            optimise_block(block, layers, inputs, targets, kwargs, self.opts,
                           seed=self.config.seed * 1_000_003 + index, device=self.device)
        for layer in layers:
            layer.pack_()
        next_inputs = ActivationStore(self._spill_dir(f"inputs_{index + 1}"))
        after, delta_after = evaluate_block(block, inputs, targets, kwargs, self.opts.loss, self.device, next_inputs)
        inputs.clear()
        if fp_inputs is not None:  # the fp block's outputs are the fp model's inputs of the next block
            fp_inputs.clear()
            fp_inputs = fp_next if fp_next is not None else targets.copy(self._spill_dir(f"fp_inputs_{index + 1}"))
        targets.clear()
        report = BlockReport(index, len(layers), before, after, time.perf_counter() - t0, delta_before, delta_after)
        self.result.blocks.append(report)
        self._save_state(index, next_inputs, fp_inputs, fingerprint)
        bar.set_postfix_str(f"block {index}: loss {before:.4g} → {after:.4g}")
        bar.update(1)
        logger.info(f"LittleBit block {index}: {len(layers)} layers, loss {before:.4g} -> {after:.4g} "
                    f"({report.seconds:.1f} s)")
        return next_inputs, fp_inputs
