"""Speed and memory of the group-quantized tied head (issue 22) on SmolLM2-135M's real 49,152 × 576 embedding: the
PyTorch chunked path against the CPU kernel, and both against the dense fp32 and bf16 heads, in the same run.

usage: python bench/group_head.py [--bits 2 3 4] [--group-size 64] [--tokens 1 4] [--threads 1 2] [--repeat 10]
                                  [--cache-dir DIR] [--out bench/results/group_head.json]

For each width the embedding is quantized as ``embedding_bits`` does (``GroupQuantEmbedding.set_weight_``); per
thread count, width and token count the four heads are called round by round (so that load from elsewhere on the
machine hits them alike), ``--repeat`` rounds after 2 warm-up calls each, and the median per call is reported:

* ``pytorch``: ``GroupQuantEmbedding._head_forward``, the chunked decode + matmul (what ``logits`` runs on more
  than ``GROUP_HEAD_MAX_TOKENS`` = 64 tokens, with a gradient, or without the kernel);
* ``kernel``: ``GroupQuantEmbedding.logits``, which dispatches to the C++ kernel (Python overhead included; past
  ``GROUP_HEAD_MAX_TOKENS`` tokens, where ``logits`` would not, ``group_head_forward`` itself);
* ``fp32`` / ``bf16``: ``x @ Wᵀ`` with the dense embedding in that dtype (x in the same dtype).

Memory: the MiB each head keeps resident (stored tensors) and the extra peak resident memory of one 4-token call
(``VmHWM`` reset through ``/proc/self/clear_refs`` before the call, after ``malloc_trim``, minus the resident memory
before it), plus the process's peak RSS at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import resource
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from hf_littlebit.assets import SMOLLM2, default_cache_dir
from hf_littlebit.backends.cpu import cpu_kernel_available, group_head_applies, group_head_forward
from hf_littlebit.nn.group_embedding import GroupQuantEmbedding

KEY = "model.embed_tokens.weight"
MIB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def transient_mib(fn, *args) -> float | None:
    """Peak resident memory of one call of ``fn`` above the resident memory before it (None where /proc lacks it)."""
    gc.collect()
    try:  # hand memory that earlier calls freed back to the OS, so that reusing it shows as new resident pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn(*args)
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


@torch.inference_mode()
def median_ms(calls: dict[str, tuple], repeat: int) -> dict[str, float]:
    for fn, *args in calls.values():
        for _ in range(2):
            fn(*args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, (fn, *args) in calls.items():
            t = time.perf_counter()
            fn(*args)
            samples[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/group_head.json")
    args = ap.parse_args()
    if not cpu_kernel_available():
        raise SystemExit("the packed CPU kernel is not available here (see the warning): nothing to compare")
    model = default_cache_dir(args.cache_dir) / "models" / SMOLLM2 / "model.safetensors"
    if not model.exists():
        raise SystemExit(f"{model} not found: run `littlebit fetch-assets` first")
    with safe_open(str(model), "pt") as f:
        weight = f.get_tensor(KEY).float()
    vocab, hidden = weight.shape
    dense = {"fp32": weight, "bf16": weight.to(torch.bfloat16)}
    heads = {}
    for bits in args.bits:
        t0 = time.perf_counter()
        heads[bits] = GroupQuantEmbedding(vocab, hidden, bits, args.group_size)
        heads[bits].set_weight_(weight)
        print(f"quantized {bits}-bit g{args.group_size} in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    print(f"\n| head ({vocab:,} × {hidden}) | threads | tokens | PyTorch path ms | kernel ms | dense fp32 ms | "
          "dense bf16 ms | kernel vs PyTorch | kernel vs fp32 | kernel vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bits, emb in heads.items():
                for tokens in args.tokens:
                    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens))
                    xb = x.to(torch.bfloat16)
                    # past GROUP_HEAD_MAX_TOKENS logits would not dispatch: the kernel is called directly
                    kernel = (emb.logits, x) if group_head_applies(emb, x) else (group_head_forward, emb, x)
                    ms = median_ms({"pytorch": (emb._head_forward, x), "kernel": kernel,
                                    "fp32": (torch.matmul, x, dense["fp32"].T),
                                    "bf16": (torch.matmul, xb, dense["bf16"].T)}, args.repeat)
                    rows.append({"bits": bits, "group_size": args.group_size, "threads": threads, "tokens": tokens,
                                 **{f"{k}_ms": v for k, v in ms.items()}})
                    print(f"| {bits}-bit g{args.group_size} | {threads} | {tokens} | {ms['pytorch']:.2f} | "
                          f"{ms['kernel']:.2f} | {ms['fp32']:.2f} | {ms['bf16']:.2f} | "
                          f"{ms['pytorch'] / ms['kernel']:.1f}× | {ms['fp32'] / ms['kernel']:.2f}× | "
                          f"{ms['bf16'] / ms['kernel']:.2f}× |", flush=True)
    finally:
        torch.set_num_threads(before)

    memory = []
    x = torch.randn(4, hidden)
    print(f"\n| head | stored MiB | extra peak MiB, one 4-token call ({torch.get_num_threads()} threads) |")
    print("|---|---|---|")
    with torch.inference_mode():
        for name, w in dense.items():
            extra = transient_mib(torch.matmul, x.to(w.dtype), w.T)
            memory.append({"head": f"dense {name}", "stored_mib": w.numel() * w.element_size() / MIB,
                           "extra_mib": extra})
        for bits, emb in heads.items():
            stored = sum(t.numel() * t.element_size() for t in (emb.codes, emb.scales, emb.zeros))
            for path, fn in (("PyTorch path", emb._head_forward), ("kernel", emb.logits)):
                memory.append({"head": f"{bits}-bit g{args.group_size}, {path}", "stored_mib": stored / MIB,
                               "extra_mib": transient_mib(fn, x)})
    for m in memory:
        extra = "n/a" if m["extra_mib"] is None else f"{m['extra_mib']:.1f}"
        print(f"| {m['head']} | {m['stored_mib']:.1f} | {extra} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS: {peak:.0f} MiB (all heads above resident at once, plus the fp32 weight)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "timing": rows, "memory": memory,
                               "peak_rss_mib": peak}, indent=1))


if __name__ == "__main__":
    main()
