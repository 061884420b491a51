"""Which format for the token embedding of a whole-model checkpoint (issue 22): binary low-rank against few-bit group
quantization on SmolLM2-135M's real 49,152 × 576 tied embedding.

usage: python bench/embedding_formats.py [--ranks 64 256 576] [--bits 2 3 4] [--groups 64 128]
                                         [--ppl binary:256 group:4:64 ...] [--max-tokens 4096] [--seqlen 2048]
                                         [--out bench/results/embedding_formats.json]

Rows are merged into ``--out`` (one per format and measurement), so the perplexity runs can be split over calls.

For every format: the relative reconstruction error ‖E − Ê‖_F / ‖E‖_F, the megabytes it stores (10⁶ bytes: sign
words with padding + fp16 scale vectors for binary low-rank, code words + fp16 scales and zeros for the groups) and
the bits per entry. Binary rows are Dual-SVID with the residual path (``littlebit``, as ``whole_model`` builds them);
group rows are :func:`hf_littlebit.format.group_quant.quantize_groups`, what ``embedding_bits`` builds.

``--ppl`` adds the perplexity of the fp model with *only* the embedding (and so the tied head) replaced by Ê, on the
first ``--max-tokens`` tokens of the test split: the embedding format's own damage, without the linears'.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hf_littlebit.assets import ensure_assets
from hf_littlebit.factorize import factorize
from hf_littlebit.format.budget import stored_bits
from hf_littlebit.format.group_quant import dequantize_groups, group_quant_bits, quantize_groups

KEY = "model.embed_tokens.weight"


def binary(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    paths = factorize(weight, rank, method="littlebit", residual=True)
    return sum(p.reconstruct(torch.float32) for p in paths), stored_bits(weight.shape[1], weight.shape[0], rank, True)


def group(weight: torch.Tensor, bits: int, size: int) -> tuple[torch.Tensor, int]:
    codes, scales, zeros = quantize_groups(weight, bits, size)
    return dequantize_groups(codes, scales, zeros, size), group_quant_bits(*weight.shape, bits, size)


def build(weight: torch.Tensor, spec: str) -> tuple[torch.Tensor, int]:
    kind, *nums = spec.split(":")
    return binary(weight, int(nums[0])) if kind == "binary" else group(weight, int(nums[0]), int(nums[1]))


def label(spec: str) -> str:
    kind, *nums = spec.split(":")
    return f"binary low-rank, rank {nums[0]} (residual)" if kind == "binary" else f"{nums[0]}-bit, groups of {nums[1]}"


def perplexity_with(model_dir: Path, weight: torch.Tensor, max_tokens: int, seqlen: int, cache_dir: str | None
                    ) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_littlebit.eval.perplexity import perplexity, tokenize_stream

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(weight)  # the tied head shares this tensor
    ids = tokenize_stream(AutoTokenizer.from_pretrained(model_dir), ensure_assets(cache_dir, model=False).text("test"),
                          max_tokens)
    return perplexity(model, token_ids=ids, seqlen=seqlen, progress=False).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=[64, 256, 576])
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--groups", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--ppl", nargs="*", default=[], help="formats to run perplexity with: binary:RANK, group:BITS:SIZE"
                                                         " or dense")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/embedding_formats.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_assets(args.cache_dir).model_dir
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        weight = f.get_tensor(KEY).float()
    rows, cols = weight.shape
    specs = [f"binary:{r}" for r in args.ranks] + [f"group:{b}:{g}" for b in args.bits for g in args.groups]
    results = []
    print(f"| format ({rows:,} × {cols} embedding) | stored MB | bits per entry | relative error | seconds |")
    print("|---|---|---|---|---|")
    for spec in specs:
        t0 = time.perf_counter()
        approx, bits = build(weight, spec)
        seconds = time.perf_counter() - t0
        error = ((weight - approx).norm() / weight.norm()).item()
        results.append({"format": spec, "mb": bits / 8e6, "bits_per_entry": bits / weight.numel(), "error": error,
                        "seconds": seconds})
        print(f"| {label(spec)} | {bits / 8e6:.2f} | {bits / weight.numel():.3f} | {error:.3f} | {seconds:.1f} |",
              flush=True)
    print(f"| fp16 (dense) | {16 * weight.numel() / 8e6:.2f} | 16 | 0 | — |")
    for spec in args.ppl:
        approx = weight if spec == "dense" else build(weight, spec)[0]
        t0 = time.perf_counter()
        ppl = perplexity_with(model_dir, approx, args.max_tokens, args.seqlen, args.cache_dir)
        results.append({"format": spec, "ppl": ppl, "max_tokens": args.max_tokens, "seqlen": args.seqlen})
        print(f"perplexity, only the embedding/head as {spec}: {ppl:.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    out = Path(args.out)  # merged with the rows already there (a row per format and measurement)
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    keys = {(r["format"], "ppl" in r) for r in results}
    rows = [r for r in old if (r["format"], "ppl" in r) not in keys] + results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
