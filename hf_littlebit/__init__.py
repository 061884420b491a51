"""hf_littlebit: sub-1-bit binary low-rank quantization for Hugging Face Transformers.

Importing the package registers ``quant_method="littlebit"`` with Transformers::

    import hf_littlebit
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=hf_littlebit.LittleBitConfig(bpw=0.55))
"""

from __future__ import annotations

from .api import quantize
from .backends import set_backend
from .calibration import CalibrationError
from .config import LittleBitConfig
from .hub import NotALittleBitModelError, from_pretrained, model_card, push_to_hub, save_pretrained
from .integration import LittleBitCheckpointError
from .layer import LittleBitLinear
from .modes import LittleBitTrainingError, make_trainable, pack
from .peft_lora import register_lora
from .quantizer import LittleBitHfQuantizer, LittleBitQuantizationError
from .reconstruct import ReconstructionError
from .registration import register
from .summary import ModelSummary, summary
from .training import DistillationConfig, LittleBitQATCallback, LittleBitTrainer, distillation_loss

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
    "ReconstructionError",
    "distillation_loss",
    "from_pretrained",
    "make_trainable",
    "model_card",
    "pack",
    "push_to_hub",
    "quantize",
    "register",
    "register_lora",
    "save_pretrained",
    "set_backend",
    "summary",
]

register()
register_lora()
