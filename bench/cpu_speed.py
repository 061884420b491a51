"""CPU speed and memory of packed layers and of a whole packed model, against dense bf16 in the same run.

    python bench/cpu_speed.py layers          # 1-token layer calls: packed CPU kernel vs dense bf16 / fp32 nn.Linear
    python bench/cpu_speed.py model           # SmolLM2 greedy decode: bf16, fp32, packed 1.0 / 0.55 / 0.3 bpw

Layers: 4096×4096 and 8192×28672 at 1.0 and 0.55 bpw (LittleBit rank rule, two paths; random signs and scales:
speed does not depend on their values), median of repeated calls after warm-up, threads = torch's default.
Model: each configuration runs in its own process (so its peak RSS is its own): load, 5-token prompt, 32 greedy
tokens, tokens/s over the 32, the process's peak RSS and its RSS right after the imports (the baseline). Packed
models are saved once data-free (Dual-SVID) with the non-quantized parts in bf16 and loaded from the folder (decode
speed does not depend on how the factors were found); ``torch-0.55`` is the same model on the PyTorch backend
(fp32 factors cached per layer), i.e. the CPU path before the packed kernel.
Results go to BENCHMARKS.md with this command line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

BACK_TO_BACK = False  # --back-to-back: each contender's calls in one run instead of interleaved rounds


@torch.no_grad()
def _time(repeat: int, calls: dict[str, tuple]) -> dict[str, float]:
    """Median seconds per call of each ``name: (fn, *args)``. By default the calls are interleaved round by round,
    so that load from elsewhere on the machine hits every contender alike (the ratios are what the benchmark
    reports); with ``--back-to-back`` each contender runs its calls in a row (as layers of one kind follow each other
    in a model), after the others."""
    for fn, *args in calls.values():
        for _ in range(3):
            fn(*args)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    rounds = [[(name, call)] * repeat for name, call in calls.items()] if BACK_TO_BACK else \
        [list(calls.items())] * repeat
    for batch in rounds:
        for name, (fn, *args) in batch:
            t = time.perf_counter()
            fn(*args)
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_layers(repeat: int) -> list[dict]:
    from hf_littlebit import LittleBitLinear
    from hf_littlebit.backends.cpu import cpu_forward
    from hf_littlebit.format.budget import choose_rank

    rows = []
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out in ((4096, 4096), (8192, 28672)):
        dense = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16)
        dense32 = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float32)
        x16 = torch.randn(1, d_in, dtype=torch.bfloat16)
        for bpw in (1.0, 0.55):
            rank = choose_rank(d_in, d_out, bpw, True).rank
            layer = LittleBitLinear(d_in, d_out, rank, bias=False, residual=True)
            with torch.no_grad():
                for p in layer.parameters():
                    if p.dtype == torch.int32:
                        p.copy_(torch.randint(-2**31, 2**31 - 1, p.shape, generator=gen, dtype=torch.int64).int())
                    else:
                        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            t = _time(repeat, {"packed": (cpu_forward, layer, x16), "bf16": (dense, x16),
                               "fp32": (dense32, x16.float())})
            rows.append({
                "shape": f"{d_out}x{d_in}", "bpw": bpw, "rank": rank,
                "true_bpw": layer.stored_bits() / (d_in * d_out),
                "packed_ms": 1e3 * t["packed"], "bf16_ms": 1e3 * t["bf16"], "fp32_ms": 1e3 * t["fp32"],
                "speedup_vs_bf16": t["bf16"] / t["packed"], "speedup_vs_fp32": t["fp32"] / t["packed"],
                "packed_MiB": layer.stored_bits() / 8 / 2**20, "bf16_MiB": 2 * d_in * d_out / 2**20,
            })
            print(json.dumps(rows[-1]), flush=True)
            if (d_in, d_out, bpw) == (4096, 4096, 1.0):
                rows.append(bench_prefill(layer, dense32, max(3, repeat // 4)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_prefill(layer, dense, repeat: int, tokens: int = 512) -> dict:
    """512 tokens through one layer: the packed path (tiled GEMM) against the cached fp32 folded factors of the
    PyTorch path (warm cache: its steady state) and the dense fp32 layer."""
    from hf_littlebit.backends.cpu import cpu_forward
    from hf_littlebit.backends.reference import torch_forward
    from hf_littlebit.backends.tiled import TILE_BYTES

    x = torch.randn(tokens, layer.in_features)
    t = _time(repeat, {"packed": (cpu_forward, layer, x), "cached": (torch_forward, layer, x), "fp32": (dense, x)})
    cache_mib = sum(f.numel() * f.element_size() for f in layer.folded_factors(x.device, torch.float32)) / 2**20
    layer.clear_cache()
    t_packed, t_cached, t_fp32 = t["packed"], t["cached"], t["fp32"]
    return {"prefill_tokens": tokens, "shape": f"{layer.out_features}x{layer.in_features}", "rank": layer.rank,
            "packed_ms": 1e3 * t_packed, "cached_torch_ms": 1e3 * t_cached, "fp32_ms": 1e3 * t_fp32,
            "packed_vs_cached": t_cached / t_packed, "packed_workspace_MiB": TILE_BYTES / 2**20,
            "cached_factors_MiB": cache_mib}


MODEL_KINDS = ("bf16", "fp32", "packed-1.0", "packed-0.55", "packed-0.3", "torch-0.55")


def packed_folder(bpw: float) -> str:
    """A saved SmolLM2 at ``bpw`` (data-free Dual-SVID, non-quantized parts in bf16), made once and cached."""
    from transformers import AutoModelForCausalLM

    import hf_littlebit

    assets = hf_littlebit.ensure_assets()
    folder = assets.model_dir.parent.parent / "bench" / f"smollm2-{bpw:g}bpw-bf16"
    if not (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(assets.model_dir), dtype=torch.bfloat16,
                                                     quantization_config=hf_littlebit.LittleBitConfig(bpw=bpw))
        hf_littlebit.save_pretrained(model, folder)
    return str(folder)


def run_model(kind: str, tokens: int) -> dict:
    """One configuration in this process (see :data:`MODEL_KINDS`): load, prompt, greedy decode, tokens/s and RSS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_littlebit

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # python + torch + transformers + ours
    path = str(hf_littlebit.ensure_assets().model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    if kind in ("bf16", "fp32"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    else:
        backend, bpw = kind.split("-")
        model = AutoModelForCausalLM.from_pretrained(
            packed_folder(float(bpw)), quantization_config=hf_littlebit.LittleBitConfig(
                backend="cpu" if backend == "packed" else backend))
    model.eval()
    param_mib = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()) / 2**20
    ids = tok("The capital of France is", return_tensors="pt").input_ids[:, :5]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up (and the CPU kernel's first use)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": kind, "tokens_per_s": tokens / seconds, "peak_rss_MiB": peak, "baseline_rss_MiB": baseline,
            "over_baseline_MiB": peak - baseline, "params_MiB": param_mib,
            "rss_budget_MiB": 1.25 * param_mib + 64, "threads": torch.get_num_threads(),
            "text": tok.decode(out[0, ids.shape[1]:])}


def bench_model(tokens: int, kinds: list[str]) -> list[dict]:
    for kind in kinds:  # make the packed folders first, outside the measured processes
        if kind.split("-")[0] in ("packed", "torch"):
            packed_folder(float(kind.split("-")[1]))
    rows = []
    for kind in kinds:
        res = subprocess.run([sys.executable, __file__, "_one", kind, "--tokens", str(tokens)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "bf16"), None)
    for row in rows:
        row["speedup_vs_bf16"] = row["tokens_per_s"] / base if base else float("nan")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["layers", "model", "_one"])
    ap.add_argument("kind", nargs="*", help=f"model configurations (default: all of {MODEL_KINDS})")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--back-to-back", action="store_true", help="layers: time each contender's calls in a row")
    args = ap.parse_args()
    global BACK_TO_BACK
    BACK_TO_BACK = args.back_to_back
    if args.what == "_one":
        print(json.dumps(run_model(args.kind[0], args.tokens)))
        return
    rows = bench_layers(args.repeat) if args.what == "layers" else bench_model(args.tokens, args.kind or MODEL_KINDS)
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
