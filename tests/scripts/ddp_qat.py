"""Two-process QAT step (run by tests/test_qat_ddp.py under ``accelerate launch --cpu --num_processes 2``).

usage: ddp_qat.py FP_CHECKPOINT OUT_DIR — trains a trainable tiny model for 3 steps with a teacher, saves the
packed result from rank 0 and writes each rank's parameter checksum, so the test can check the replicas agree.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_littlebit

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
fp, out = sys.argv[1], Path(sys.argv[2])
teacher = AutoModelForCausalLM.from_pretrained(fp)
student = AutoModelForCausalLM.from_pretrained(
    fp, quantization_config=hf_littlebit.LittleBitConfig(bpw=1.0, trainable=True))
ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": r, "labels": r} for r in ids]
args = TrainingArguments(output_dir=str(out / "run"), max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                         report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                         ddp_backend="gloo", learning_rate=1e-3)
trainer = hf_littlebit.LittleBitTrainer(model=student, args=args, train_dataset=data, teacher=teacher)
trainer.train()
rank = trainer.args.process_index
checksum = sum(float(p.detach().double().sum()) for p in student.parameters() if p.is_floating_point())
(out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.args.world_size, "checksum": checksum,
                                                   "packed": all(layer.is_packed for layer in
                                                                 hf_littlebit.nn.layer.littlebit_layers(student)
                                                                 .values())}))
if trainer.is_world_process_zero():
    student.save_pretrained(out / "packed")
