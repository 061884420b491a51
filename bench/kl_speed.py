"""Forward + backward time of the per-token KL: autograd's plain formula vs ``hf_littlebit.nn.kl.token_kl``.

usage: python bench/kl_speed.py [--tokens 1024] [--vocab 49152] [--repeats 5]

Random logits of the end-to-end calibration phase's size (4 × 256 tokens, SmolLM2's vocabulary), both versions in
the same run, alternating; reports the median of each and their ratio, and checks the two agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_littlebit.nn.kl import token_kl


def autograd_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_s = torch.log_softmax(student.float(), dim=-1)
    log_t = torch.log_softmax(teacher.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def timed(fn, student0: torch.Tensor, teacher: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    student = student0.clone().requires_grad_(True)
    t0 = time.perf_counter()
    kl = fn(student, teacher).mean()
    kl.backward()
    return time.perf_counter() - t0, kl.detach(), student.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    student = torch.randn(args.tokens, args.vocab) * 3
    teacher = torch.randn(args.tokens, args.vocab) * 3
    times: dict[str, list[float]] = {"autograd": [], "token_kl": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("autograd", autograd_kl), ("token_kl", token_kl)):
            seconds, kl, grad = timed(fn, student, teacher)
            times[name].append(seconds)
            results[name] = (kl, grad)
    torch.testing.assert_close(results["token_kl"][0], results["autograd"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["token_kl"][1], results["autograd"][1], rtol=1e-4, atol=1e-9)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.tokens} tokens × {args.vocab} vocabulary, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}: autograd {med['autograd']:.3f} s, token_kl {med['token_kl']:.3f} s, "
          f"ratio {med['autograd'] / med['token_kl']:.2f}×")


if __name__ == "__main__":
    main()
