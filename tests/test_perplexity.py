import math

import pytest
import torch

from hf_littlebit.eval.perplexity import perplexity, tokenize_stream, tokenizer_bos

from .conftest import fake_text, make_tiny_model, make_tiny_tokenizer


def hand_ppl(model, ids, window, bos=None):
    """Direct computation: per window, sum of -log p(token_t+1 | prefix) over the shifted targets."""
    total, count = 0.0, 0
    for w in range(ids.numel() // window):
        chunk = ids[w * window : (w + 1) * window].tolist()
        if bos is not None:
            chunk = [bos] + chunk
        logits = model(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(len(chunk) - 1):
            total -= logp[t, chunk[t + 1]].item()
            count += 1
    return math.exp(total / count), count


@torch.no_grad()
def test_matches_a_hand_computed_value():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, token_ids=ids, seqlen=16, progress=False)
    expected, count = hand_ppl(model, ids, 16)
    assert res.windows == 6 and res.tokens == count == 6 * 15
    assert res.ppl == pytest.approx(expected, rel=1e-5)
    batched = perplexity(model, token_ids=ids, seqlen=16, batch_size=4, progress=False)
    assert batched.ppl == pytest.approx(res.ppl, rel=1e-5)


@torch.no_grad()
def test_bos_is_prepended_per_window_and_seqlen_is_capped_by_context():
    model = make_tiny_model("llama")  # max_position_embeddings = 64
    ids = torch.randint(1, 128, (200,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, token_ids=ids, seqlen=2048, bos_token_id=0, progress=False)
    assert res.seqlen == 63 and res.windows == 3
    expected, count = hand_ppl(model, ids, 63, bos=0)
    assert res.ppl == pytest.approx(expected, rel=1e-5) and res.tokens == count


@torch.no_grad()
def test_text_path_max_tokens_and_errors():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    text = fake_text(300)
    ids = tokenize_stream(tok, text, max_tokens=128)
    assert ids.numel() == 128 and tokenizer_bos(tok) is None
    res = perplexity(model, tok, text, seqlen=32, max_tokens=128, progress=False)
    assert res.windows == 4 and res.ppl == pytest.approx(perplexity(model, token_ids=ids, seqlen=32,
                                                                      progress=False).ppl)
    short = perplexity(model, token_ids=ids[:10], seqlen=32, progress=False)
    assert short.windows == 1 and short.tokens == 9
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, token_ids=ids[:1], progress=False)
    with pytest.raises(ValueError, match="tokenizer and a text"):
        perplexity(model, text=text, progress=False)
