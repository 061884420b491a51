"""The packed layer (:class:`~hf_littlebit.nn.layer.LittleBitLinear`), its trainable mode, the autograd functions
they train with (sign estimators, chunked token KL), whole-model mode switches, and fused MoE experts split into one
such layer per expert (:mod:`~hf_littlebit.nn.experts`).

May import :mod:`hf_littlebit.format`, :mod:`hf_littlebit.factorize` (the ``FactorPath`` container),
:mod:`hf_littlebit.backends` and ``errors``; knows nothing of Transformers (of its experts modules, only the attribute
names that its ``use_experts_implementation`` decorator sets).
"""
