"""Per-layer reconstruction error of Dual-SVID, Joint-ITQ and DBF on the real SmolLM2-135M weights.

usage: python bench/layer_error.py [--bpw 1.0 0.55 0.1] [--blocks 0 5 10 15 20 25 29] [--dbf-iterations 100]
                                   [--itq-iterations 50] [--out bench/results/layer_error.json]
                                   [--report-only]

For every ``nn.Linear`` of the chosen decoder blocks and every bpw target, each method factorises the fp weight as
``hf_littlebit`` does by default (littlebit / littlebit2: the paper's rank rule with the residual path; dbf: DBF's
rule, one path) and the fp16 low-rank SVD of the same true storage as the littlebit layer is the non-binary
baseline. Prints, per bpw, the mean relative Frobenius error ‖W − Ŵ‖/‖W‖, the share of layers where each method
is best, the mean true bpw and the factorisation seconds per layer (2 threads).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_littlebit.assets import ensure_assets
from hf_littlebit.factorize import factorize, relative_error
from hf_littlebit.format.budget import choose_rank, dbf_rank, stored_bits, true_bpw

METHODS = ("littlebit", "littlebit2", "dbf")


def lowrank_error(w: torch.Tensor, bits: int) -> float:
    """Error of the fp16 truncated SVD whose factors take ``bits`` (rank ⌊bits / (16 (d_in + d_out))⌋)."""
    rank = max(1, bits // (16 * sum(w.shape)))
    p, s, qh = torch.linalg.svd(w, full_matrices=False)
    approx = (p[:, :rank] * s[:rank]).half().float() @ qh[:rank].half().float()
    return (torch.linalg.norm(w - approx) / torch.linalg.norm(w)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, nargs="+", default=[1.0, 0.55, 0.1])
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29])
    ap.add_argument("--dbf-iterations", type=int, default=100)
    ap.add_argument("--itq-iterations", type=int, default=50)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/layer_error.json")
    ap.add_argument("--report-only", action="store_true", help="print the table of the rows saved in --out")
    args = ap.parse_args()
    if args.report_only:
        report(json.loads(Path(args.out).read_text()))
        return
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(ensure_assets(args.cache_dir).model_dir))
    layers = {name: m.weight.detach().float() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(f"layers.{b}." in name for b in args.blocks)}
    rows = []
    for bpw in args.bpw:
        for name, w in layers.items():
            d_out, d_in = w.shape
            row: dict = {"bpw": bpw, "layer": name, "shape": [d_out, d_in]}
            for method in METHODS:
                residual = method != "dbf"
                rule = dbf_rank if method == "dbf" else choose_rank
                rank = rule(d_in, d_out, bpw, residual).rank
                opts = {"n_iter": args.dbf_iterations if method == "dbf" else args.itq_iterations} \
                    if method != "littlebit" else {}
                t = time.perf_counter()
                paths = factorize(w, rank, method=method, residual=residual, name=name, options=opts)
                row[method] = {"error": relative_error(w, paths), "rank": rank, "seconds": time.perf_counter() - t,
                               "true_bpw": true_bpw(d_in, d_out, rank, residual)}
            lb_rank = row["littlebit"]["rank"]
            row["fp16_lowrank"] = {"error": lowrank_error(w, stored_bits(d_in, d_out, lb_rank, True)),
                                   "true_bpw": row["littlebit"]["true_bpw"]}
            rows.append(row)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))  # kept up to date: an interrupted run keeps rows
            print(f"{bpw:g} {name}: " + "  ".join(f"{m} {row[m]['error']:.3f}"
                                                  for m in (*METHODS, "fp16_lowrank")), flush=True)
    report(rows)


def report(rows: list[dict]) -> None:
    names = (*METHODS, "fp16_lowrank")
    print("| bpw | layers | " + " | ".join(f"{m} error (true bpw)" for m in names) + " | best: share of layers "
          "| s / layer (" + ", ".join(METHODS) + ") |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for bpw in sorted({r["bpw"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["bpw"] == bpw]
        n = len(sel)
        cells = [f"{sum(r[m]['error'] for r in sel) / n:.3f} ({sum(r[m]['true_bpw'] for r in sel) / n:.2f})"
                 for m in names]
        wins = {m: sum(min(names, key=lambda k, r=r: r[k]["error"]) == m for r in sel) for m in names}
        share = ", ".join(f"{m} {100 * wins[m] / n:.0f}%" for m in names if wins[m])
        secs = ", ".join(f"{sum(r[m]['seconds'] for r in sel) / n:.2f}" for m in METHODS)
        print(f"| {bpw:g} | {n} | " + " | ".join(cells) + f" | {share} | {secs} |")


if __name__ == "__main__":
    main()
