"""Turning a full-precision model into a packed one: fused MoE experts split into per-expert Linears first
(``experts``), which Linears and which ranks (``plan``, ``allocate``), the layers built from the factorisers
(``layers``), calibration data and activation statistics, the in-place conversion (``convert``) and calibrated
block-wise reconstruction (``reconstruct/``).

May import :mod:`hf_littlebit.config`, ``errors``, ``format``, ``factorize``, ``nn`` and ``eval``; never the
Transformers quantizer (``integrations``) or ``training``.
"""
