"""GPU readiness check of the Triton kernels, in one run of under five minutes on one GPU.

usage: python bench/gpu_check.py [--out bench/results/gpu_check.json] [--skip-model] [--dry-run]

Five phases, each recorded in one JSON file (``--out``) and printed as Markdown tables (also written next to the
JSON as ``.md``). A phase that fails records its error and the run goes on: a GPU hour is too scarce to lose every
figure to one exception.

1. **compile**: every kernel variant the layer can launch (decode at 1/2/4/8 tokens and prefill with fp16, bf16
   and fp32 activations, residual path on and off) is compiled and run once; registers and spills per compiled
   kernel are read from Triton's cache where it exposes them.
2. **accuracy**: fp16 and bf16 outputs of the kernels on real shapes (decode and prefill) against the PyTorch path
   in fp32, with the tolerances of ``tests/test_kernels.py``.
3. **layers**: decode (1 token) and prefill (512 tokens) times of packed layers at 1.0 / 0.55 / 0.1 bpw against
   cuBLAS fp16 (``torch.nn.functional.linear``) for 4096×4096 and 8192×28672 (d_in×d_out). Each call is captured in
   a CUDA graph and replayed with the L2 cache flushed before every replay (a packed layer fits in L2 and would
   otherwise look faster than memory allows); medians of CUDA-event times. "GB/s" is the bytes a call must move
   (packed words, scales, activations) over its time, "roofline" that over the measured copy bandwidth.
4. **model**: greedy decoding tokens/s of a random Llama (static KV cache, which Transformers compiles and replays
   as CUDA graphs) in fp16 against the same model with every linear layer but the head replaced by a random packed
   layer at ``--model-bpw`` (speed does not depend on the values, so no factorisation is spent).

5. **group head**: the Triton kernel of a group-quantized tied head (``whole_model`` with ``embedding_bits``) at 1
   and 8 tokens, 3 and 4 bits, on SmolLM2's 49,152 × 576 and a 128,256 × 4,096 vocabulary: its error against the
   decoded matrix in fp32, and its time against the PyTorch path (chunked decode + matmul) and a dense fp16 head.

``--dry-run`` runs everything on CPU under the Triton interpreter (it sets ``TRITON_INTERPRET=1`` itself) at tiny
shapes, with wall-clock timing instead of CUDA graphs: it checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GPU_SHAPES = ((4096, 4096), (8192, 28672))
DRY_SHAPES = ((64, 96),)
BPWS = (1.0, 0.55, 0.1)
#: Relative error bounds against the fp32 PyTorch path, as in tests/test_kernels.py.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-5}
L2_FLUSH_BYTES = 512 << 20


# --------------------------------------------------------------------------------------------------- plumbing
def _phase(result: dict, name: str, fn: Callable[[], list[dict]]) -> None:
    """Run one phase; keep its rows, or its error (the other phases still run)."""
    start = time.perf_counter()
    try:
        result[name] = fn()
    except Exception:  # noqa: BLE001 - recorded, so that one failure does not cost the other figures
        result[name] = []
        result.setdefault("errors", {})[name] = traceback.format_exc()
        print(f"[{name}] FAILED:\n{result['errors'][name]}", file=sys.stderr, flush=True)
    result.setdefault("phase_s", {})[name] = round(time.perf_counter() - start, 2)
    print(f"[{name}] {result['phase_s'][name]:.1f} s", flush=True)


def _op_args(layer: Any) -> list:
    names = ("v_bits", "g", "l", "u_bits", "h")
    args = [getattr(layer, n) for n in names]
    args += [getattr(layer, "res_" + n) for n in names] if layer.residual else [None] * 5
    return [*args, layer.bias]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _packed_layer(d_in: int, d_out: int, bpw: float, residual: bool, device: str, dtype: torch.dtype) -> Any:
    from kernel_speed import random_packed_layer

    return random_packed_layer(d_in, d_out, bpw, residual, device, "triton").to(dtype)


# --------------------------------------------------------------------------------------------------- 1. compile
def _jit_functions(kernel: Any) -> Any:
    """The ``JITFunction`` under autotune/heuristics wrappers."""
    while not hasattr(kernel, "device_caches") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _compiled_stats(name: str, kernel: Any) -> list[dict]:
    """Registers and spills of every compiled specialisation of ``kernel`` (none under the interpreter)."""
    caches = getattr(_jit_functions(kernel), "device_caches", None)
    if caches is None:
        return [{"kernel": name, "n_regs": None, "n_spills": None, "note": "interpreter: nothing is compiled"}]
    rows = []
    for entry in caches.values():
        for compiled in entry[0].values():
            init = getattr(compiled, "_init_handles", None)
            if init is not None:
                init()
            rows.append({"kernel": name, "n_regs": getattr(compiled, "n_regs", None),
                         "n_spills": getattr(compiled, "n_spills", None),
                         "constants": str(getattr(compiled, "constants", ""))[:200]})
    return rows


def compile_variants(device: str, shape: tuple[int, int]) -> list[dict]:
    from hf_littlebit.backends.triton import load_kernels

    kernels = load_kernels()
    d_in, d_out = shape
    for residual in (True, False):
        layer = _packed_layer(d_in, d_out, 1.0, residual, device, torch.float16)
        for tokens in (1, 2, 4, 8):
            kernels.binary_lowrank_linear(torch.randn(tokens, d_in, device=device, dtype=torch.float16),
                                          *_op_args(layer))
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(16, d_in, device=device, dtype=dtype)
            kernels.binary_lowrank_linear(x, *_op_args(layer.to(dtype)))
    if device == "cuda":
        torch.cuda.synchronize()
    rows = []
    for name in ("_gemv_stage1", "_gemv_stage2", "_gemm_stage1", "_gemm_stage2"):
        rows += _compiled_stats(name, getattr(kernels, name))
    return rows


# --------------------------------------------------------------------------------------------------- 2. accuracy
def accuracy(device: str, shapes: tuple, prefill_tokens: int) -> list[dict]:
    from hf_littlebit.backends.reference import torch_forward
    from hf_littlebit.backends.triton import load_kernels

    kernels = load_kernels()
    rows = []
    for d_in, d_out in shapes:
        layer = _packed_layer(d_in, d_out, 1.0, True, device, torch.float32)
        for tokens in (1, prefill_tokens):
            x = torch.randn(tokens, d_in, device=device, generator=torch.Generator(device=device).manual_seed(0))
            with torch.no_grad():
                ref = torch_forward(layer, x)
                for dtype in (torch.float16, torch.bfloat16):
                    y = kernels.binary_lowrank_linear(x.to(dtype), *_op_args(layer))
                    err = _rel_err(y, torch_forward(layer, x.to(dtype).float()))
                    rows.append({"shape": f"{d_in}x{d_out}", "tokens": tokens, "dtype": str(dtype)[6:],
                                 "rel_err": err, "tolerance": TOLERANCE[dtype], "ok": err < TOLERANCE[dtype],
                                 "rel_err_vs_fp32_input": _rel_err(y, ref)})
    return rows


# --------------------------------------------------------------------------------------------------- 3. layers
def _graph_time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph, with the L2 cache flushed before each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles and autotunes
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _wall_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timer(device: str, reps: int) -> Callable[[Callable[[], Any]], float]:
    return (lambda fn: _graph_time(fn, reps)) if device == "cuda" else (lambda fn: _wall_time(fn, reps))


def copy_bandwidth(device: str, timer: Callable) -> float:
    n = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timer(lambda: dst.copy_(src))


def layers(device: str, shapes: tuple, prefill_tokens: int, reps: int) -> list[dict]:
    from kernel_speed import packed_bytes

    timer = _timer(device, reps)
    peak = copy_bandwidth(device, timer)
    dtype = torch.float16
    rows = []
    for d_in, d_out in shapes:
        weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / d_in**0.5
        for tokens in (1, prefill_tokens):
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            io_bytes = (x.numel() + tokens * d_out) * x.element_size()
            with torch.inference_mode():
                dense_s = timer(lambda x=x, w=weight: torch.nn.functional.linear(x, w))
                for bpw in BPWS:
                    layer = _packed_layer(d_in, d_out, bpw, True, device, dtype)
                    packed_s = timer(lambda x=x, layer=layer: layer(x))
                    moved = packed_bytes(layer) + io_bytes
                    rows.append({"shape": f"{d_in}x{d_out}", "tokens": tokens, "bpw": bpw, "rank": layer.rank,
                                 "dense_us": dense_s * 1e6, "packed_us": packed_s * 1e6,
                                 "speedup": dense_s / packed_s, "packed_GBps": moved / packed_s / 1e9,
                                 "roofline": moved / packed_s / peak, "copy_GBps": peak / 1e9})
                    del layer
    return rows


# --------------------------------------------------------------------------------------------------- 5. group head
GROUP_HEAD_SHAPES = ((49152, 576), (128256, 4096))
DRY_GROUP_HEAD_SHAPES = ((300, 96),)


def group_head(device: str, shapes: tuple, reps: int) -> list[dict]:
    from hf_littlebit.backends.triton import triton_group_head
    from hf_littlebit.nn.group_embedding import GroupQuantEmbedding

    timer = _timer(device, reps)
    rows = []
    for vocab, hidden in shapes:
        weight = torch.randn(vocab, hidden, device=device) / hidden**0.5
        dense = weight.half()
        for bits in (3, 4):
            emb = GroupQuantEmbedding(vocab, hidden, bits, 64, device=device)
            emb.set_weight_(weight)
            for tokens in (1, 8):
                x = torch.randn(tokens, hidden, device=device, dtype=torch.float16)
                with torch.inference_mode():
                    ref = x.float() @ emb.dequantize_weight().T
                    err = _rel_err(triton_group_head(emb, x), ref)
                    kernel_s = timer(lambda emb=emb, x=x: triton_group_head(emb, x))
                    chunked_s = timer(lambda emb=emb, x=x: emb._head_forward(x))
                    dense_s = timer(lambda x=x, w=dense: torch.nn.functional.linear(x, w))
                rows.append({"shape": f"{vocab}x{hidden}", "bits": bits, "tokens": tokens, "rel_err": err,
                             "ok": err < TOLERANCE[torch.float16], "triton_us": kernel_s * 1e6,
                             "chunked_us": chunked_s * 1e6, "dense_fp16_us": dense_s * 1e6,
                             "vs_chunked": chunked_s / kernel_s, "vs_dense": dense_s / kernel_s})
            del emb
    return rows


# --------------------------------------------------------------------------------------------------- 4. model
def _replace_linears(model: torch.nn.Module, bpw: float, device: str, dtype: torch.dtype) -> int:
    """Every ``nn.Linear`` but the LM head becomes a random packed layer of the same shape; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        packed = _packed_layer(linear.in_features, linear.out_features, bpw, True, device, dtype)
        setattr(model.get_submodule(parent), child, packed)
    return len(names)


def model_speed(device: str, size: tuple[int, int, int, int], new_tokens: int, bpw: float) -> list[dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, n_layers, vocab = size
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=512)
    dtype = torch.float16 if device == "cuda" else torch.float32
    prompt = torch.randint(0, vocab, (1, 8), device=device, generator=torch.Generator(device=device).manual_seed(0))
    extra = {"cache_implementation": "static"} if device == "cuda" else {}

    def tokens_per_s(model: torch.nn.Module) -> float:
        def run() -> None:  # the first (untimed) run compiles and captures graphs on CUDA
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
            if device == "cuda":
                torch.cuda.synchronize()

        return new_tokens / _wall_time(run, 1)

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    fp_tps = tokens_per_s(model)
    replaced = _replace_linears(model, bpw, device, dtype)
    packed_tps = tokens_per_s(model)
    return [{"model": f"llama {hidden}/{inter}/{n_layers} vocab {vocab}", "bpw": bpw, "packed_layers": replaced,
             "new_tokens": new_tokens, "fp_tokens_per_s": fp_tps, "littlebit_tokens_per_s": packed_tps,
             "speedup": packed_tps / fp_tps}]


# --------------------------------------------------------------------------------------------------- report
def _md(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(result: dict) -> str:
    parts = [f"device: {result['device']} · torch {result['torch']} · triton {result['triton']} · dry run: "
             f"{result['dry_run']} · phases (s): {result.get('phase_s')}"]
    parts.append(_md(result["compile"], ["kernel", "n_regs", "n_spills", "constants", "note"]))
    parts.append(_md(result["accuracy"], ["shape", "tokens", "dtype", "rel_err", "tolerance", "ok"]))
    parts.append(_md(result["layers"], ["shape", "tokens", "bpw", "rank", "dense_us", "packed_us", "speedup",
                                        "packed_GBps", "roofline"]))
    parts.append(_md(result.get("model", []), ["model", "bpw", "new_tokens", "fp_tokens_per_s",
                                               "littlebit_tokens_per_s", "speedup"]))
    parts.append(_md(result.get("group_head", []), ["shape", "bits", "tokens", "rel_err", "ok", "triton_us",
                                                    "chunked_us", "dense_fp16_us", "vs_chunked", "vs_dense"]))
    if result.get("errors"):
        parts.append("errors in phases: " + ", ".join(result["errors"]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes (plumbing only)")
    ap.add_argument("--skip-model", action="store_true", help="leave out the whole-model phase")
    ap.add_argument("--model-bpw", type=float, default=0.55)
    ap.add_argument("--reps", type=int, default=50, help="timed replays per measurement (1 in a dry run)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. on their first import
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --dry-run")
    import triton

    device = "cpu" if args.dry_run else "cuda"
    shapes, prefill = (DRY_SHAPES, 16) if args.dry_run else (GPU_SHAPES, 512)
    reps = 1 if args.dry_run else args.reps
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
                    "torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
                    "command": "python " + " ".join(["bench/gpu_check.py", *(argv or sys.argv[1:])])}
    _phase(result, "compile", lambda: compile_variants(device, shapes[0]))
    _phase(result, "accuracy", lambda: accuracy(device, shapes, prefill))
    _phase(result, "layers", lambda: layers(device, shapes, prefill, reps))
    if not args.skip_model:
        size = (64, 96, 1, 128) if args.dry_run else (4096, 11008, 4, 32000)
        _phase(result, "model", lambda: model_speed(device, size, 2 if args.dry_run else 32, args.model_bpw))
    _phase(result, "group_head", lambda: group_head(device, DRY_GROUP_HEAD_SHAPES if args.dry_run
                                                    else GROUP_HEAD_SHAPES, reps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = report(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
