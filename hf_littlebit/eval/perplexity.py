"""Perplexity by the standard protocol (METHODS.md §3.4).

The text is tokenised as one stream without special tokens, cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped; a text shorter than one window is scored as a single window), each window is scored
independently and ``PPL = exp(Σ NLL / Σ predicted tokens)`` over the ``T − 1`` shifted targets of every window. If the
tokenizer itself adds a BOS token (Gemma), every window gets BOS in front, as the model was trained; tokenizers
that add none (SmolLM2, Qwen) are not given one, and no other tokenizer's BOS id is forced on them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers.utils import logging


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens scored
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends it by itself, else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    return bos if bos is not None and probe and probe[0] == bos else None


def tokenize_stream(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), optionally only the first ``max_tokens``."""
    if max_tokens:
        # tokenise only a prefix that surely holds enough tokens (≥ 1 char per token), not the whole corpus
        text = text[: max_tokens * 16]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    token_ids: torch.Tensor | None = None,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (with ``tokenizer``) or on ready ``token_ids``.

    ``seqlen`` is capped by the model's context length (BOS included). ``bos_token_id`` defaults to what the
    tokenizer adds by itself.
    """
    if token_ids is None:
        if tokenizer is None or text is None:
            raise ValueError("perplexity needs either token_ids, or a tokenizer and a text")
        token_ids = tokenize_stream(tokenizer, text, max_tokens)
        if bos_token_id is None:
            bos_token_id = tokenizer_bos(tokenizer)
    ids = token_ids.reshape(-1)
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    ctx = context_length(model)
    extra = 1 if bos_token_id is not None else 0
    window = min(seqlen, ctx - extra) if ctx else seqlen
    n_windows = max(ids.numel() // window, 1)
    window = min(window, ids.numel())
    chunks = ids[: n_windows * window].view(n_windows, window)
    if bos_token_id is not None:
        chunks = torch.cat([torch.full((n_windows, 1), bos_token_id, dtype=chunks.dtype), chunks], dim=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    bar = logging.tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress)
    for start in range(0, n_windows, batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        bar.update(batch.shape[0])
    bar.close()
    model.train(was_training)
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=n_windows, seqlen=window)
