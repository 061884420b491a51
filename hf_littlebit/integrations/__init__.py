"""Glue to the libraries around us: the Transformers quantizer and its registration, in-place
:func:`~hf_littlebit.integrations.in_place.quantize`, checkpoint checks, Hub helpers, PEFT LoRA and lm-eval.

May import everything below it (``quantize``, ``nn``, ``eval``, ``config``...); never ``training`` or ``cli``.
"""
