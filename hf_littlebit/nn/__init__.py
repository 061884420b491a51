"""The packed layer (:class:`~hf_littlebit.nn.layer.LittleBitLinear`), its trainable mode, the autograd functions
they train with (sign estimators, chunked token KL), whole-model mode switches, fused MoE experts split into one
such layer per expert (:mod:`~hf_littlebit.nn.experts`), and the packed embeddings of ``whole_model`` (binary
low-rank in :mod:`~hf_littlebit.nn.embedding`, few-bit groups in :mod:`~hf_littlebit.nn.group_embedding`).

May import :mod:`hf_littlebit.format`, :mod:`hf_littlebit.factorize` (the ``FactorPath`` container),
:mod:`hf_littlebit.backends` and ``errors``; knows nothing of Transformers (of its experts modules, only the attribute
names that its ``use_experts_implementation`` decorator sets).
"""
