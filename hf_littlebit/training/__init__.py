"""Quantization-aware training with the Hugging Face ``Trainer``: the distillation loss, the QAT callback and
``LittleBitTrainer``.

May import ``nn``, ``quantize``, ``factorize``, ``format`` and ``errors``; never ``integrations`` or ``cli``.
"""
