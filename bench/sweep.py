"""Post-training bpw sweep on the bundled SmolLM2-135M: LittleBit (± residual) against baselines at equal storage.

usage: python bench/sweep.py [--bpw 2.0 1.0 0.8 0.55 0.3 0.1] [--max-tokens 8192] [--seqlen 2048]
                             [--hqq-bits 2 3 4] [--out bench/results/sweep.json] [--plot bench/results/sweep.png]

Rows (all on the same test tokens, every decoder nn.Linear converted, LM head / embeddings / norms untouched):
* ``littlebit`` / ``littlebit-nores``: Dual-SVID with / without the residual path (the real packed layer);
* ``littlebit2``: Joint-ITQ rotation (50 iterations) + Dual-SVID, with the residual path;
* ``fp16-lowrank``: plain truncated SVD with fp16 factors, per layer the rank whose storage equals the LittleBit
  (residual) layer's true bits at that bpw;
* ``sign``: per-row-scaled sign binarisation of W (1 bit + one fp16 scale per row);
* ``hqq-Nbit``: HQQ (``pip install hqq``) at group size 64, its true bits counting packed codes plus fp16 scale
  and zero per group.
Results are appended to the JSON file as they come, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_littlebit
from hf_littlebit.assets import ensure_assets
from hf_littlebit.eval.perplexity import perplexity, tokenize_stream
from hf_littlebit.format.budget import choose_rank, stored_bits


def linear_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def lowrank_(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    d_out, d_in = w.shape
    k = max(1, bits // (16 * (d_in + d_out)))
    p, s, qh = torch.linalg.svd(w.float(), full_matrices=False)
    approx = (p[:, :k].half().float() * s[:k].half().float()) @ qh[:k].half().float()
    return approx, 16 * k * (d_in + d_out)


def sign_(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    scale = w.abs().mean(dim=1, keepdim=True).half().float()
    return torch.where(w < 0, -scale, scale), w.numel() + 16 * w.shape[0]


def hqq_(w: torch.Tensor, nbits: int, group: int = 64) -> tuple[torch.Tensor, int]:
    from hqq.core.quantize import Quantizer

    wq, meta = Quantizer.quantize(w.float(), nbits=nbits, group_size=group, optimize=True, axis=1, device="cpu",
                                  compute_dtype=torch.float32)
    bits = wq.numel() * wq.element_size() * 8 + 16 * (meta["scale"].numel() + meta["zero"].numel())
    return Quantizer.dequantize(wq, meta).reshape(w.shape), bits


def simulate(model, fn) -> tuple[int, int]:
    """Replace every decoder Linear weight by ``fn(weight)``'s approximation; returns (bits, dense weights)."""
    bits = dense = 0
    with torch.no_grad():
        for layer in linear_layers(model).values():
            approx, b = fn(layer.weight)
            layer.weight.copy_(approx.to(layer.weight.dtype))
            bits += b
            dense += layer.weight.numel()
    return bits, dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.0, 1.0, 0.8, 0.55, 0.3, 0.1])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--hqq-bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--skip", nargs="*", default=[], help="row kinds to skip (littlebit, littlebit-nores, ...)")
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/sweep.json")
    ap.add_argument("--plot", default="bench/results/sweep.png")
    ap.add_argument("--report-only", action="store_true", help="re-print the table and re-draw the plot from --out")
    args = ap.parse_args()
    if args.report_only:
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(markdown(rows))
        if args.plot:
            plot(rows, Path(args.plot))
        return
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    assets = ensure_assets(args.cache_dir)
    path = str(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tokenize_stream(tok, assets.text("test"), args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def record(kind, bpw_target, model, bits, dense, seconds):
        t = time.perf_counter()
        res = perplexity(model, token_ids=ids, seqlen=args.seqlen, progress=False)
        row = {"kind": kind, "bpw_target": bpw_target, "bpw_true": bits / dense if dense else 16.0,
               "linear_MB": bits / 8 / 1e6, "ppl": res.ppl, "eval_tokens": res.tokens,
               "seconds_quantize": seconds, "seconds_eval": time.perf_counter() - t}
        rows.append(row)
        out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens,
                                   "seqlen": args.seqlen, "rows": rows}, indent=1))
        print(json.dumps(row), flush=True)

    fp = AutoModelForCausalLM.from_pretrained(path)
    dense = sum(m.weight.numel() for m in linear_layers(fp).values())
    record("fp32 (reference)", None, fp, 16 * dense, dense, 0.0)  # counted as fp16 storage
    shapes = [(m.in_features, m.out_features) for m in linear_layers(fp).values()]
    del fp

    for bpw in args.bpw:
        for kind, method, residual in (("littlebit", "littlebit", True), ("littlebit-nores", "littlebit", False),
                                       ("littlebit2", "littlebit2", True)):
            if kind in args.skip:
                continue
            t = time.perf_counter()
            cfg = hf_littlebit.LittleBitConfig(bpw=bpw, method=method, residual=residual)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
            seconds = time.perf_counter() - t
            report = hf_littlebit.summary(model)
            record(kind, bpw, model, round(report.bpw_true * report.converted_params), report.converted_params,
                   seconds)
            del model
        if "fp16-lowrank" not in args.skip:
            model = AutoModelForCausalLM.from_pretrained(path)
            budget = iter([stored_bits(i, o, choose_rank(i, o, bpw, True).rank, True) for i, o in shapes])
            t = time.perf_counter()
            bits, n = simulate(model, lambda w, _b=budget: lowrank_(w, next(_b)))
            record("fp16-lowrank", bpw, model, bits, n, time.perf_counter() - t)
            del model
    if "sign" not in args.skip:
        model = AutoModelForCausalLM.from_pretrained(path)
        t = time.perf_counter()
        bits, n = simulate(model, sign_)
        record("sign", 1.0, model, bits, n, time.perf_counter() - t)
    for nbits in args.hqq_bits:
        model = AutoModelForCausalLM.from_pretrained(path)
        t = time.perf_counter()
        bits, n = simulate(model, lambda w, _n=nbits: hqq_(w, _n))
        record(f"hqq-{nbits}bit", float(nbits), model, bits, n, time.perf_counter() - t)
        del model

    print(markdown(rows))
    if args.plot:
        plot(rows, Path(args.plot))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | target bpw | true bpw (linear layers) | linear layers MB | perplexity | quantize s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        target = "—" if r["bpw_target"] is None else f"{r['bpw_target']:g}"
        ppl = f"{r['ppl']:.2f}" if r["ppl"] < 1e4 else f"{r['ppl']:.2e}"
        lines.append(f"| {r['kind']} | {target} | {r['bpw_true']:.3f} | {r['linear_MB']:.1f} | {ppl} | "
                     f"{r['seconds_quantize']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: [r["kind"] for r in rows].index(k))
    for kind in kinds:
        pts = sorted((r["bpw_true"], r["ppl"]) for r in rows if r["kind"] == kind and math.isfinite(r["ppl"]))
        if kind.startswith("fp32"):
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=f"fp model ({pts[0][1]:.1f})")
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight of the decoder linear layers")
    ax.set_ylabel("perplexity (Wikipedia test split)")
    ax.set_title("SmolLM2-135M, post-training (no data)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
