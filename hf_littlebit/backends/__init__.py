"""Forward implementations of the packed layer and the choice between them: the PyTorch reference, the glue to the
Triton kernels (which live in the repository's top-level ``kernels/`` folder, shipped as ``hf_littlebit.kernels``),
and the per-call dispatch.

Sees the layer only through its attributes; may import :mod:`hf_littlebit.format` and ``hf_littlebit.kernels``.
"""
