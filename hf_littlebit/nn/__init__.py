"""The packed layer (:class:`~hf_littlebit.nn.layer.LittleBitLinear`), its trainable mode, the autograd functions
they train with (sign estimators, chunked token KL), and whole-model mode switches.

May import :mod:`hf_littlebit.format`, :mod:`hf_littlebit.factorize` (the ``FactorPath`` container) and
:mod:`hf_littlebit.backends`; knows nothing of Transformers.
"""
