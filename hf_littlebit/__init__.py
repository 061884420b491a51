"""hf_littlebit: sub-1-bit binary low-rank quantization for Hugging Face Transformers.

Importing the package registers ``quant_method="littlebit"`` with Transformers (and the LoRA mapping with PEFT)::

    import hf_littlebit
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=hf_littlebit.LittleBitConfig(bpw=0.55))

The house, each sub-package importing only those before it (README "Layout"):
``format`` → ``factorize`` → ``backends`` → ``nn`` → ``eval`` → ``quantize`` → ``integrations`` / ``training`` →
``cli``; ``config`` and ``errors`` sit beside them. Everything a user needs is re-exported here.
"""

from __future__ import annotations

from .assets import ensure_assets
from .config import LittleBitConfig
from .errors import (
    CalibrationError,
    LittleBitCheckpointError,
    LittleBitQuantizationError,
    LittleBitTrainingError,
    NotALittleBitModelError,
    ReconstructionError,
)
from .eval.perplexity import PerplexityResult, perplexity, tokenize_stream
from .eval.summary import ModelSummary, summary
from .integrations.hub import from_pretrained, model_card, push_to_hub, save_pretrained
from .integrations.in_place import quantize
from .integrations.peft_lora import add_lora_mapping, register_lora
from .integrations.quantizer import LittleBitHfQuantizer
from .integrations.registration import register
from .nn.layer import LittleBitLinear
from .nn.modes import make_trainable, pack, set_backend
from .training.callback import LittleBitQATCallback
from .training.distillation import DistillationConfig, distillation_loss
from .training.trainer import LittleBitTrainer

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "DistillationConfig",
    "LittleBitCheckpointError",
    "LittleBitConfig",
    "LittleBitHfQuantizer",
    "LittleBitLinear",
    "LittleBitQATCallback",
    "LittleBitQuantizationError",
    "LittleBitTrainer",
    "LittleBitTrainingError",
    "ModelSummary",
    "NotALittleBitModelError",
    "PerplexityResult",
    "ReconstructionError",
    "add_lora_mapping",
    "distillation_loss",
    "ensure_assets",
    "from_pretrained",
    "make_trainable",
    "model_card",
    "pack",
    "perplexity",
    "push_to_hub",
    "quantize",
    "register",
    "register_lora",
    "save_pretrained",
    "set_backend",
    "summary",
    "tokenize_stream",
]

register()
register_lora()
