"""Measuring a model: the perplexity protocol and the size/bits report (``summary``).

May import ``nn`` and ``format``; used by ``quantize``, ``integrations`` and ``cli``.
"""
