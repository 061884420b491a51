"""Relative reconstruction error of Dual-SVID and Joint-ITQ (± residual path) on synthetic matrices.

usage: python bench/factorize_error.py [--n 1024] [--seed 0]
Prints a Markdown table (equal storage: the residual variant splits the rank budget between two paths).
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_littlebit.factorize import factorize, relative_error
from hf_littlebit.format.budget import paper_rank, true_bpw


def gauss(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5


def power_law(n: int, g: torch.Generator, alpha: float) -> torch.Tensor:
    p, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (p * torch.arange(1, n + 1, dtype=torch.float64) ** -alpha) @ q.T


def channel_scaled(n: int, g: torch.Generator) -> torch.Tensor:
    rows = torch.exp(0.7 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    cols = torch.exp(0.7 * torch.randn(1, n, generator=g, dtype=torch.float64))
    return rows * gauss(n, g) * cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(args.seed)
    families = {
        "gauss": gauss(args.n, g),
        "pl05_incoh": power_law(args.n, g, 0.5),
        "pl10_incoh": power_law(args.n, g, 1.0),
        "chan_scaled": channel_scaled(args.n, g),
    }
    print(f"| matrix ({args.n}²) | bpw | rank (no res / res) | true bpw (no res / res) | Dual-SVID "
          "| Dual-SVID + residual | Joint-ITQ | Joint-ITQ + residual | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, w in families.items():
        for bpw in (1.0, 0.55, 0.3, 0.1):
            t = time.perf_counter()
            r1, r2 = paper_rank(args.n, args.n, bpw, False), paper_rank(args.n, args.n, bpw, True)
            e1 = relative_error(w, factorize(w, r1, residual=False))
            e2 = relative_error(w, factorize(w, r2, residual=True))
            e3 = relative_error(w, factorize(w, r1, method="littlebit2", residual=False))
            e4 = relative_error(w, factorize(w, r2, method="littlebit2", residual=True))
            tb1, tb2 = true_bpw(args.n, args.n, r1, False), true_bpw(args.n, args.n, r2, True)
            errors = " | ".join(f"{e:.3f}" for e in (e1, e2, e3, e4))
            print(f"| {name} | {bpw} | {r1} / {r2} | {tb1:.3f} / {tb2:.3f} | {errors} | "
                  f"{time.perf_counter() - t:.1f} |")


if __name__ == "__main__":
    main()
