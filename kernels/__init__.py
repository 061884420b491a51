"""Triton kernels for packed LittleBit layers (installed as ``hf_littlebit.kernels``).

This folder sits at the top of the repository but is shipped *inside* the ``hf_littlebit`` package: Transformers
probes for a top-level module named ``kernels`` (the Hugging Face kernels library), which a top-level folder of
ours would shadow. Triton is optional; without it the plain-PyTorch backend is used. The kernel module
(:mod:`hf_littlebit.kernels.binary_lowrank`) is imported only on first use, so ``import hf_littlebit`` never pays
for Triton, and so ``TRITON_INTERPRET`` (read when kernels are decorated) can still be set before then.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU to run on)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
