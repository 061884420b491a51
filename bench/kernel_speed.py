"""Speed of one packed LittleBit layer against the dense layer of the same shape, measured in the same run.

(Named ``kernel_speed.py``, not ``kernels.py``: a module called ``kernels`` next to the bench scripts would be found
first on ``sys.path`` by every script in this folder, and Transformers would take it for the Hugging Face
``kernels`` library.)

usage: python bench/kernel_speed.py [--device auto|cuda|cpu] [--tokens 1 8 512] [--bpw 1.0 0.55 0.3 0.1]
                               [--shapes 4096x4096 4096x11008 11008x4096 8192x28672] [--no-residual]
                               [--e2e | --no-e2e] [--out PATH] [--report-only]

On a GPU the packed layer runs the Triton kernels (``backend="triton"``: split-K GEMV up to 8 tokens, ``tl.dot``
GEMM above) against ``torch.nn.functional.linear`` in fp16 (cuBLAS). Times are medians of
``triton.testing.do_bench``, which clears the L2 cache before every call (each packed layer would otherwise sit in
the 50 MB L2 and look faster than memory allows). "GB/s" is the bytes a call must move (packed words, scales,
activations in and out) over its time; "roofline" divides that by the copy bandwidth measured in the same run.

On a CPU the same script measures the PyTorch path (``backend="torch"``: fp32, ±1 factors unpacked once and cached)
against the dense fp32 matmul, with wall-clock medians; the packed CPU kernel (the default on CPU) is measured by
``bench/cpu_speed.py``.

Shapes are ``d_in×d_out`` (4096×11008 is an up-projection). The layers have random packed signs and scales at the
rank the paper's rule gives for each bpw (the kernels' speed does not depend on the values).

``--e2e`` adds greedy-decoding tokens/s of a randomly initialised Llama model (fp vs LittleBit at each bpw,
data-free factors; on CUDA with a static KV cache, which Transformers compiles and replays as CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from hf_littlebit import LittleBitConfig, LittleBitLinear
from hf_littlebit.format.budget import choose_rank

DEFAULT_SHAPES = ("4096x4096", "4096x11008", "11008x4096", "8192x28672")


def random_packed_layer(d_in: int, d_out: int, bpw: float, residual: bool, device: str, backend: str
                        ) -> LittleBitLinear:
    """A packed layer of the paper's rank at ``bpw`` with random signs and scales."""
    rank = choose_rank(d_in, d_out, bpw, residual).rank
    layer = LittleBitLinear(d_in, d_out, rank, bias=False, residual=residual, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for param in layer.parameters():
        if param.dtype == torch.int32:
            param.data = torch.randint(-2**31, 2**31 - 1, param.shape, dtype=torch.int32, device=device,
                                       generator=gen)
        else:
            param.data = (0.5 + torch.rand(param.shape, device=device, generator=gen)).to(param.dtype) / rank**0.5
    layer.backend = backend
    return layer


def packed_bytes(layer: LittleBitLinear) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical memory roofline."""
    n = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * n / seconds


def timed(fn, device: str, budget_s: float = 2.0) -> float:
    """Median seconds per call: ``do_bench`` (L2 flushed before each call) on CUDA; on CPU the wall-clock median
    of 3–20 calls (as many as fit in about ``budget_s``) after two warm-up calls."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    t = time.perf_counter()
    fn()
    reps = max(3, min(20, int(budget_s / max(time.perf_counter() - t, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_layers(args, device: str) -> list[dict]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "torch"
    peak = copy_bandwidth(device)
    rows = []
    for shape in args.shapes:
        d_in, d_out = (int(v) for v in shape.split("x"))
        weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
        for tokens in args.tokens:
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            io_bytes = (x.numel() + tokens * d_out) * x.element_size()
            with torch.inference_mode():
                dense_s = timed(partial(torch.nn.functional.linear, x, weight), device)
            for bpw in args.bpw:
                layer = random_packed_layer(d_in, d_out, bpw, not args.no_residual, device, backend)
                with torch.inference_mode():
                    packed_s = timed(partial(layer, x), device)
                moved = packed_bytes(layer) + io_bytes
                rows.append({
                    "device": device_name(device), "shape": shape, "tokens": tokens, "bpw": bpw,
                    "rank": layer.rank, "residual": layer.residual, "backend": backend,
                    "dense_dtype": str(dtype).removeprefix("torch."),
                    "dense_ms": dense_s * 1e3, "packed_ms": packed_s * 1e3, "speedup": dense_s / packed_s,
                    "packed_GBps": moved / packed_s / 1e9,
                    "dense_GBps": (weight.numel() * weight.element_size() + io_bytes) / dense_s / 1e9,
                    "copy_GBps": peak / 1e9, "roofline": moved / packed_s / peak,
                })
                print(format_row(rows[-1]), flush=True)
    return rows


def bench_end_to_end(args, device: str) -> list[dict]:
    """Greedy decoding tokens/s, fp vs quantized, on a random Llama of the given size."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_littlebit

    dtype = torch.float16 if device == "cuda" else torch.float32
    hidden, inter, layers = args.e2e_model
    heads = max(1, hidden // 64)
    kv_heads = next(d for d in (heads // 8, heads // 4, heads // 3, heads) if d >= 1 and heads % d == 0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048)
    prompt = torch.randint(0, 32000, (1, 16), device=device, generator=torch.Generator(device=device).manual_seed(0))
    extra = {"cache_implementation": "static"} if device == "cuda" else {}

    def tokens_per_second(model) -> float:
        run = lambda: model.generate(prompt, max_new_tokens=args.e2e_tokens, min_new_tokens=args.e2e_tokens,  # noqa: E731
                                     do_sample=False, **extra)
        run()  # warm-up: compiles / captures graphs on CUDA
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return args.e2e_tokens / (time.perf_counter() - t)

    rows = []
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    fp_tps = tokens_per_second(fp)
    state = {k: v.clone() for k, v in fp.state_dict().items()}
    del fp
    for bpw in args.bpw:
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.float32)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        hf_littlebit.quantize(model, LittleBitConfig(bpw=bpw), progress=False)  # factorises on the model's device
        model = model.to(dtype=dtype).eval()
        summary = hf_littlebit.summary(model)
        rows.append({"device": device_name(device), "model": f"llama {hidden}/{inter}/{layers}", "bpw": bpw,
                     "bpw_true": summary.bpw_true, "new_tokens": args.e2e_tokens, "fp_tokens_per_s": fp_tps,
                     "littlebit_tokens_per_s": tokens_per_second(model)})
        rows[-1]["speedup"] = rows[-1]["littlebit_tokens_per_s"] / fp_tps
        print(f"e2e {rows[-1]['model']} bpw {bpw}: fp {fp_tps:.1f} tok/s, littlebit "
              f"{rows[-1]['littlebit_tokens_per_s']:.1f} tok/s ({rows[-1]['speedup']:.2f}×)", flush=True)
        del model
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def format_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['tokens']} | {r['bpw']:g} | {r['rank']} | {r['dense_ms']:.4f} | "
            f"{r['packed_ms']:.4f} | {r['speedup']:.2f}× | {r['packed_GBps']:.1f} | {100 * r['roofline']:.0f} % |")


def report(result: dict) -> None:
    print(f"device: {result['device']}, copy bandwidth {result['copy_GBps']:.0f} GB/s, command: {result['command']}")
    print(f"| shape (in×out) | tokens | bpw | rank | dense {result['dense_dtype']} ms | packed ms | speedup | "
          "packed GB/s | roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["layers"]:
        print(format_row(r))
    if result.get("e2e"):
        print("\n| model | bpw (true) | new tokens | fp tok/s | littlebit tok/s | speedup |\n|---|---|---|---|---|---|")
        for r in result["e2e"]:
            print(f"| {r['model']} | {r['bpw']:g} ({r['bpw_true']:.3f}) | {r['new_tokens']} | "
                  f"{r['fp_tokens_per_s']:.1f} | {r['littlebit_tokens_per_s']:.1f} | {r['speedup']:.2f}× |")


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512])
    ap.add_argument("--bpw", type=float, nargs="+", default=[1.0, 0.55, 0.3, 0.1])
    ap.add_argument("--no-residual", action="store_true")
    ap.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure greedy decoding tokens/s of a whole model")
    ap.add_argument("--e2e-model", type=int, nargs=3, metavar=("HIDDEN", "INTERMEDIATE", "LAYERS"),
                    help="random Llama size (default: 2048 5632 22 on CUDA, 576 1536 30 on CPU)")
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--out", help="default: bench/results/kernels_<device>.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out or f"bench/results/kernels_{device}.json")
    if args.report_only:
        report(json.loads(out.read_text()))
        return
    torch.set_num_threads(args.threads)
    args.e2e_model = args.e2e_model or ([2048, 5632, 22] if device == "cuda" else [576, 1536, 30])
    result = {"device": device_name(device), "command": "python " + " ".join(sys.argv),
              "dense_dtype": "float16" if device == "cuda" else "float32", "torch": torch.__version__}
    if device == "cuda":
        import triton

        result["triton"] = triton.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    result["layers"] = bench_layers(args, device)
    result["copy_GBps"] = result["layers"][0]["copy_GBps"] if result["layers"] else 0.0
    result["e2e"] = []
    out.write_text(json.dumps(result, indent=1))  # the layer rows survive a failure of the end-to-end part
    if args.e2e:
        result["e2e"] = bench_end_to_end(args, device)
        out.write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
