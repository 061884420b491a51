"""Kernels for packed LittleBit layers, installed as ``hf_littlebit.kernels``: the Triton kernels
(``binary_lowrank``) and the C++ source of the packed CPU kernel (``binary_lowrank_cpu.cpp``, compiled on first use by
:mod:`hf_littlebit.backends.cpu`).

The kernel module (:mod:`hf_littlebit.kernels.binary_lowrank`) is imported only on first use by
:mod:`hf_littlebit.backends.triton`, so ``import hf_littlebit`` never pays for Triton. This package imports nothing
of hf_littlebit.
"""
