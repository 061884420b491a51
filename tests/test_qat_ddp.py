"""QAT under DDP: two CPU processes, gloo backend, launched like ``accelerate launch --multi_gpu`` does (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).parent / "scripts" / "ddp_qat.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_qat_step_agrees_across_ranks_and_saves_packed(fp_checkpoint, tmp_path, tokens):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPT), fp_checkpoint("llama"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["packed"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas identical
    import hf_littlebit  # noqa: F401

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    with torch.no_grad():
        assert torch.isfinite(reloaded(tokens).logits).all()
