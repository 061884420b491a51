"""Shared fixtures: tiny randomly initialised models of several architectures, saved as fp checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run on CPU tensors through the interpreter; the flag is read when kernels are decorated, so it
# must be set before hf_littlebit.kernels.binary_lowrank is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import HfApi, ModelCard  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError  # noqa: E402
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


def with_threads(threads: int, fn, *args):  # noqa: ANN001, ANN201 - any callable
    """``fn(*args)`` with ``torch.set_num_threads(threads)``, the previous count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


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


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out up who said "
         "about some what its into than them only other new time could these two may first then do any like my now "
         "over such our man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def make_tiny_tokenizer():
    """A word-level fast tokenizer over 127 common words (+[UNK]) that fits the tiny models' vocab of 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS[:127])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def fake_text(n_words: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 127, (n_words,), generator=gen).tolist()
    return " ".join(WORDS[i] for i in idx)


@pytest.fixture(scope="session")
def fake_cache(tmp_path_factory):
    """An asset cache holding small prepared corpora (no model, no network)."""
    import hashlib
    import json

    cache = tmp_path_factory.mktemp("cache")
    corpora = cache / "corpora"
    corpora.mkdir()
    sums = {}
    for i, split in enumerate(("train", "validation", "test")):
        data = fake_text(400, seed=i).encode()
        (corpora / f"{split}.txt").write_bytes(data)
        sums[split] = hashlib.sha256(data).hexdigest()
    (corpora / "manifest.json").write_text(json.dumps(sums))
    return cache


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


class FakeHub:
    """Stands in for the Hub: records what would be uploaded."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        class Url(str):
            pass

        url = Url(f"https://hub.invalid/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        for p in Path(folder_path).rglob("*"):
            if p.is_file():
                self.files[str(p.relative_to(folder_path))] = p.read_bytes()
        return "commit"

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.files[op.path_in_repo] = f.read()
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    for name in ("create_repo", "upload_folder", "create_commit"):
        method = getattr(hub, name)
        monkeypatch.setattr(HfApi, name, lambda api, *a, _m=method, **k: _m(*a, **k))

    def no_card(*a, **k):
        raise EntryNotFoundError("no card")

    monkeypatch.setattr(ModelCard, "load", no_card)
    return hub
