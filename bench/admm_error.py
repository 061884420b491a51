"""DBF-ADMM vs LB-ADMM: preconditioned reconstruction error and time on heavy-tailed synthetic matrices.

usage: python bench/admm_error.py [--shape 256 512] [--ranks 32 64 128] [--seeds 0 1 2]
Each matrix is a Student-t (ν = 3) weight plus a weak rank-8 part; the preconditioners mimic calibration statistics:
input importances Student-t (ν = 2.5) squared (a few huge channels), output importances uniform in [0.1, 1.1]. The
error is ‖D_out (W − Ŵ) D_in‖ / ‖D_out W D_in‖ (what :func:`hf_littlebit.factorize.factorize` minimises with both
importances given); one path, no residual. Prints a Markdown table (mean over seeds) with seconds per factorisation.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_littlebit.factorize import factorize

VARIANTS = (("dbf", 30), ("dbf", 100), ("lbadmm", 30), ("lbadmm", 100), ("lbadmm", 400))


def problem(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((d_out, d_in)) + torch.randn(d_out, 8) @ torch.randn(8, d_in) / 3
    return w, torch.distributions.StudentT(2.5).sample((d_in,)).pow(2) + 0.01, torch.rand(d_out) + 0.1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[256, 512])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    print(f"| rank ({args.shape[0]}×{args.shape[1]}) | " + " | ".join(f"{m} {n} it" for m, n in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for rank in args.ranks:
        cells = []
        for method, n_iter in VARIANTS:
            errs, secs = [], []
            for seed in args.seeds:
                w, imp_in, imp_out = problem(*args.shape, seed)
                t = time.perf_counter()
                paths = factorize(w, rank, method=method, residual=False, options={"n_iter": n_iter},
                                  input_importance=imp_in, output_importance=imp_out)
                secs.append(time.perf_counter() - t)
                scale = imp_out.sqrt()[:, None] * imp_in.sqrt()[None, :]
                errs.append(((w - paths[0].reconstruct()) * scale).norm().item() / (w * scale).norm().item())
            cells.append(f"{sum(errs) / len(errs):.4f} ({sum(secs) / len(secs):.2f} s)")
        print(f"| {rank} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
