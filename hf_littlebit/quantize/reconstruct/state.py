"""Resume state of a calibrated run in its work folder: after each block the packed block, the next block's inputs
(and the fp model's activations) and a progress file, written atomically, so an interrupted run continues after its
last finished block. A fingerprint of model, config, data and options refuses to mix two different runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...config import LittleBitConfig
from ...errors import ReconstructionError
from .options import BlockReport, ReconstructionOptions
from .store import ActivationStore

STATE_FILE = "progress.json"
CURVATURE_FILE = "curvature.safetensors"
WORK_FORMAT = 1


def fingerprint(model: nn.Module, config: LittleBitConfig, tokens: torch.Tensor, opts: ReconstructionOptions) -> str:
    """Identifies the block-wise pass; the end-to-end phase's settings are left out, so a finished pass can be
    resumed with other end-to-end settings (only whether the fp activations are tracked matters), and so is the dtype
    the checkpoint will be saved in."""
    h = hashlib.sha256()
    end_to_end = ("e2e_steps", "e2e_lr", "e2e_latents")  # options, each a ``calibration_`` field of the config
    left_out = ("calibration", "calibrated_with", "dense_save_dtype", *(f"calibration_{n}" for n in end_to_end))
    cfg = {k: v for k, v in config.to_dict().items() if k not in left_out}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    passes = {k: v for k, v in vars(opts).items() if k not in end_to_end}
    h.update(json.dumps({**passes, "tracks_fp": opts.tracks_fp}, sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


class WorkFolder:
    """The work folder of one run (or none: ``path=None`` keeps nothing and resumes nothing).

    Layout: ``progress.json`` (format, fingerprint, next block, block reports), ``blocks/block_NNNN.safetensors``
    (each finished block's state dict, packed), ``inputs/`` and ``fp_inputs/`` (the next block's activations).
    """

    def __init__(self, path: Path | None, resume: bool, fingerprint: str) -> None:
        self.path = path
        self.resume = resume
        self.fingerprint = fingerprint
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)

    @property
    def inputs_dir(self) -> Path:
        return self.path / "inputs"

    @property
    def fp_inputs_dir(self) -> Path:
        return self.path / "fp_inputs"

    def _block_file(self, index: int) -> Path:
        return self.path / "blocks" / f"block_{index:04d}.safetensors"

    def finished_blocks(self) -> tuple[int, list[dict]]:
        """How many blocks an earlier run of the same settings finished, and their reports; ``(0, [])`` for a fresh
        run. A folder holding another run, or a run when ``resume`` is off, is an error (never overwritten)."""
        state_path = self.path / STATE_FILE if self.path is not None else None
        if state_path is None or not self.resume:
            if state_path is not None and state_path.exists():
                raise ReconstructionError(
                    f"{self.path} already holds a reconstruction run; pass resume=True (--resume) to continue "
                    "it, or choose an empty work folder"
                )
            return 0, []
        if not state_path.exists():
            return 0, []
        state = json.loads(state_path.read_text())
        if state.get("format") != WORK_FORMAT or state.get("fingerprint") != self.fingerprint:
            raise ReconstructionError(
                f"{self.path} belongs to a different run (model, config or calibration data differ); "
                "resume with the same settings, or use an empty work folder"
            )
        return int(state["next_block"]), list(state.get("reports", []))

    def load_curvature(self) -> dict[str, torch.Tensor] | None:
        """The Fisher statistics saved by this run, if any."""
        path = self.path / CURVATURE_FILE if self.path is not None else None
        return load_file(str(path)) if path is not None and path.exists() else None

    def save_curvature(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        tmp = self.path / (CURVATURE_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.path / CURVATURE_FILE)

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The saved state dict of finished block ``index``."""
        return load_file(str(self._block_file(index)))

    def save_block(self, index: int, state_dict: dict[str, torch.Tensor], inputs: ActivationStore,
                   fp_inputs: ActivationStore | None, reports: list[BlockReport]) -> None:
        """Record block ``index`` as finished: its tensors, the next block's activations, then the progress file
        (each written to a temporary name and renamed, so a crash leaves the previous consistent state)."""
        if self.path is None:
            return
        target = self._block_file(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        tmp.replace(target)
        inputs.save(self.inputs_dir)
        if fp_inputs is not None:
            fp_inputs.save(self.fp_inputs_dir)
        state = {"format": WORK_FORMAT, "fingerprint": self.fingerprint, "next_block": index + 1,
                 "reports": [vars(b) for b in reports]}
        tmp_state = self.path / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state, indent=1))
        tmp_state.replace(self.path / STATE_FILE)
