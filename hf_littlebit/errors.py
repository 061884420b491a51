"""Every error the library raises on purpose, in one place so that any layer can raise them without importing
another layer (the CLI, for one, catches them all). Each names the problem and the way out in its message."""

from __future__ import annotations


class LittleBitCheckpointError(ValueError):
    """A saved littlebit checkpoint does not match its own configuration."""


class LittleBitQuantizationError(ValueError):
    """A layer could not be quantized (NaN/Inf weights, scales out of range...)."""


class LittleBitTrainingError(ValueError):
    """The model is not set up for training (packed without adapters, missing teacher, ...)."""


class CalibrationError(ValueError):
    """The calibration input cannot give the requested samples."""


class ReconstructionError(RuntimeError):
    """The model or the work folder does not fit block-wise reconstruction."""


class NotALittleBitModelError(ValueError):
    """The folder or model is not a littlebit-quantized model."""


class BudgetTooSmallError(ValueError):
    """The model-wide budget of ``allocation="auto"`` cannot give every layer even ``min_rank`` (the scale vectors
    and the word padding of tiny ranks alone cost ~0.1 bpw on small layers)."""
