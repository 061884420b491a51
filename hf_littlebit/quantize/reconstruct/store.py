"""Where one block's calibration activations live: one tensor per batch, in memory or spilled to disk.

The pass holds a block's inputs, targets and (optionally) the fp model's activations at once; at 128 sequences of
2,048 tokens of a 4k-wide model that is gigabytes, so above a size limit each batch is a safetensors file instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
