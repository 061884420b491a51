"""A per-layer cache of tensors derived from parameters (unpacked signs, folded factors), stamped with its sources.

A packed layer's parameters can be swapped under it (accelerate's offloading hooks), moved (``.to``), or edited in
place (``load_state_dict``); a derived tensor is only valid for the exact source tensors it was built from. Each
entry is therefore stamped with the data pointer and in-place version of every source, and rebuilt when a stamp
differs instead of serving a stale value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _version(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors (made under ``torch.inference_mode``) have none."""
    return 0 if t.is_inference() else t._version


class StampedCache:
    """``key → (stamp, value)``; :meth:`get` rebuilds the value when its sources' stamp changed."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple, Any]] = {}

    def get(self, key: tuple, sources: list[torch.Tensor], build: Callable[[], Any]) -> Any:
        """``build()``, kept under ``key`` and stamped with the identity and version of each of ``sources``."""
        stamp = tuple((t.data_ptr(), _version(t)) for t in sources)
        hit = self._entries.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, build())
            self._entries[key] = hit
        return hit[1]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
