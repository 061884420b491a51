"""Triton kernels for packed LittleBit layers (installed as ``hf_littlebit.kernels``).

This folder sits at the top of the repository but is shipped *inside* the ``hf_littlebit`` package: Transformers
probes for a top-level module named ``kernels`` (the Hugging Face kernels library), which a top-level folder of
ours would shadow. Triton is optional; without it the plain-PyTorch backend is used.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU to run on)."""
    return importlib.util.find_spec("triton") is not None
