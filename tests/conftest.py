"""Shared fixtures: tiny randomly initialised models of several architectures, saved as fp checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ),
    # Qwen2 has biases on q/k/v.
    "qwen2": lambda: Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    ),
    # OPT: biases everywhere, fc1/fc2, tied LM head.
    "opt": lambda: OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64,
    ),
    # Gemma3: tied embeddings, sliding-window attention, head_dim independent of hidden size.
    "gemma3": lambda: Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=64,
    ),
}


def make_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    # Random init leaves many tensors at exactly zero / one; perturb so biases and norms are exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def fp_checkpoint(tmp_path_factory):
    """Factory: ``fp_checkpoint(arch)`` → folder of a saved fp32 tiny model (cached per architecture)."""
    cache: dict[str, str] = {}

    def build(arch: str) -> str:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"fp_{arch}")
            make_tiny_model(arch).save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return build


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
