"""Calibrated block-wise reconstruction, split by job: ``capture`` (blocks and their inputs), ``store`` (activations in
memory or on disk), ``block_fit`` (loss and Adam loop of one block), ``optim`` (shared optimiser plumbing),
``end_to_end`` (the KL phase after the pass), ``state`` (resume), ``options`` (knobs and reports) and ``driver``
(:class:`~hf_littlebit.quantize.reconstruct.driver.BlockReconstructor`, which runs them in order).

May import what :mod:`hf_littlebit.quantize` may.
"""
