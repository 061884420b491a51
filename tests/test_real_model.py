"""End to end on the real SmolLM2-135M (slow). Runs when the assets are in the cache (`littlebit fetch-assets`)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_littlebit import assets
from hf_littlebit.cli.main import main

pytestmark = pytest.mark.slow

CACHE = assets.default_cache_dir()
MODEL_DIR = CACHE / "models" / assets.SMOLLM2


needs_assets = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists() or not (CACHE / "corpora" / "manifest.json").exists(),
    reason=f"real-model assets not in {CACHE}; run `littlebit fetch-assets`",
)


@needs_assets
def test_smollm2_quantize_eval_save_reload(tmp_path, capsys):
    assert assets.sha256_file(MODEL_DIR / "model.safetensors") == assets.MODEL_SHA256
    out_dir = tmp_path / "q"
    code = main(["--quiet", "quantize", "--bpw", "0.55", "--eval", "--max-tokens", "2048", "--seqlen", "1024",
                 "--json", "--out", str(out_dir), "--calib-samples", "8", "--calib-seqlen", "128", "--steps", "4",
                 "--e2e-steps", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["layers"] == 210
    assert 15 < result["ppl_fp"] < 30  # SmolLM2 on the Wikipedia test split: ≈ 21
    assert result["ppl_quantized"] > result["ppl_fp"]  # a few calibration steps do not reach the fp model...
    assert result["calibrated"] and result["block_loss_after"] < result["block_loss_before"]
    assert result["e2e_steps"] == 2 and 0 <= result["e2e_kl_after"] < 2 * result["e2e_kl_before"]
    assert result["ppl_quantized"] < 1e8  # ...but are far from data-free 0.55 bpw (≈ 7e10 on these windows)
    assert 0.5 < result["bpw_true"] < 0.6
    assert result["model_bytes_quantized"] < 0.3 * result["model_bytes_fp"]

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    again = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@needs_assets
def test_smollm2_greedy_decoding_on_the_packed_cpu_kernel_equals_the_reference():
    """SmolLM2 at 0.55 bpw (data-free, bf16 around the packed layers) generates the same greedy tokens through the
    packed CPU kernel as through the PyTorch reference, with logits within fp32 tolerance at every step."""
    import hf_littlebit
    from hf_littlebit.backends.cpu import cpu_kernel_available

    if not cpu_kernel_available():
        pytest.skip("the packed CPU kernel cannot be built here (no C++ compiler)")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, quantization_config=hf_littlebit.LittleBitConfig(bpw=0.55))
    prompt = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    runs = {}
    for backend in ("torch", "cpu"):
        hf_littlebit.set_backend(model, backend)
        runs[backend] = model.generate(prompt, max_new_tokens=16, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(runs["torch"].sequences, runs["cpu"].sequences)
    for ref, got in zip(runs["torch"].logits, runs["cpu"].logits, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
