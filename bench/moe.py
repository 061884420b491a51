"""Mixture-of-experts (issue 21): quantize time and memory, packed experts' forward against the dense experts module,
and how many calibration tokens reach each expert — on a tiny-but-wide random Qwen3-MoE.

    python bench/moe.py [--experts 16] [--hidden 1024] [--moe-intermediate 512] [--layers 2] [--bpw 0.55]

Model: Qwen3-MoE from a config (random weights), top-2 routing, saved once as an fp32 checkpoint in a temporary
folder. Each measurement that reports memory runs in its own process (so its peak RSS is its own):

* ``load fp32``: ``from_pretrained`` of the fp checkpoint — the reference for time and peak RSS;
* ``quantize on load``: ``from_pretrained(..., quantization_config=LittleBitConfig(bpw))``, data-free, experts
  packed from the checkpoint's fused tensors one at a time;
* ``quantize in place``: load fp32, then ``hf_littlebit.quantize``.

Forward: layer 0's experts module, dense (the architecture's own class, ``eager`` and ``grouped_mm``) against the
packed one (``cpu`` kernel and ``torch`` backend), fed the router's own choice for 1 token (decode) and 64 tokens,
median of repeated calls interleaved round by round, all in this process. Routing: calibration-sized random token
ids through the fp model, tokens per expert per layer as the router sends them (what block-wise calibration sees
for each expert).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import json, sys, time, torch
import hf_littlebit
from transformers import AutoModelForCausalLM
from hf_littlebit import LittleBitConfig
mode, path, bpw = sys.argv[1], sys.argv[2], float(sys.argv[3])
def status_mib(field):  # VmHWM (peak) / VmRSS of this process; ru_maxrss would carry the parent's peak over exec
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024
base = status_mib("VmRSS")
t = time.perf_counter()
if mode == "load_fp32":
    model = AutoModelForCausalLM.from_pretrained(path)
elif mode == "on_load":
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=bpw))
else:
    model = hf_littlebit.quantize(AutoModelForCausalLM.from_pretrained(path), LittleBitConfig(bpw=bpw),
                                  progress=False)
seconds = time.perf_counter() - t
out = {"mode": mode, "seconds": seconds, "peak_rss_mib": status_mib("VmHWM"), "rss_after_imports_mib": base}
if mode != "load_fp32":
    s = hf_littlebit.summary(model)
    out.update(bpw_true=s.bpw_true, model_mib=s.model_bytes / 2**20, model_fp16_mib=s.model_bytes_fp16 / 2**20,
               experts=[(g.name, g.experts, g.out_features, g.in_features, g.rank_min, g.bpw_true) for g in s.experts])
print(json.dumps(out))
"""


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden,
                         moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=args.hidden // 8,
                         num_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # the zero-initialised routers would send every token to the same experts
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.02)
    return model


def run_child(mode: str, path: str, bpw: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, path, str(bpw)], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def interleaved_medians(contenders: dict, args: tuple, repeat: int) -> dict[str, float]:
    """Median seconds per call of each ``name: (prepare, module)``, the contenders interleaved round by round so
    that load from elsewhere on the (shared) machine hits all alike; ``prepare()`` (untimed) sets the backend or
    the experts implementation before each call."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeat + 3):
        for name, (prepare, module) in contenders.items():
            prepare()
            t = time.perf_counter()
            module(*args)
            if round_ >= 3:  # warm-up rounds
                samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in samples.items()}


@torch.no_grad()
def bench_forward(path: str, bpw: float, repeat: int) -> list[dict]:
    import copy

    from transformers import AutoModelForCausalLM

    import hf_littlebit
    from hf_littlebit import LittleBitConfig
    from hf_littlebit.backends.cpu import cpu_kernel_available

    fp = AutoModelForCausalLM.from_pretrained(path).eval()
    packed = hf_littlebit.quantize(copy.deepcopy(fp), LittleBitConfig(bpw=bpw), progress=False).eval()
    block_fp = fp.model.layers[0].mlp

    def implementation(name: str):
        return lambda: setattr(fp.config, "_experts_implementation", name)

    contenders = {f"dense fp32 ({impl})": (implementation(impl), block_fp.experts) for impl in ("eager", "grouped_mm")}
    for name in ("cpu", "torch") if cpu_kernel_available() else ("torch",):
        # one copy per backend: set_backend frees the other backend's caches (the torch path's folded factors)
        experts = copy.deepcopy(packed.model.layers[0].mlp.experts)
        hf_littlebit.set_backend(experts, name)
        contenders[f"packed {bpw} ({name})"] = (lambda: None, experts)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 64):
        x = torch.randn(tokens, fp.config.hidden_size, generator=gen)
        _, weights, index = block_fp.gate(x)
        hit = int(torch.unique(index).numel())
        for name, seconds in interleaved_medians(contenders, (x, index, weights), repeat).items():
            rows.append({"tokens": tokens, "experts_hit": hit, "module": name, "ms": 1e3 * seconds})
    return rows


@torch.no_grad()
def bench_routing(path: str, samples: int, seqlen: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    counts: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def fn(module, args):
            top_k_index = args[1]
            c = torch.bincount(top_k_index.flatten(), minlength=module.num_experts)
            counts[index] = counts.get(index, 0) + c
        return fn

    handles = [layer.mlp.experts.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    ids = torch.randint(0, model.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(5))
    for row in ids:
        model(input_ids=row[None])
    for h in handles:
        h.remove()
    return {f"layer {i}": {"min": int(c.min()), "median": float(c.float().median()), "max": int(c.max()),
                           "without_tokens": int((c == 0).sum())} for i, c in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bpw", type=float, default=0.55)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--calibration-seqlen", type=int, default=256)
    parser.add_argument("--parts", default="load,forward,routing", help="comma-separated subset to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "fp")
        make_model(args).save_pretrained(path)
        result = {"args": vars(args), "peak_rss_of_this_process_mib":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        modes = ("load_fp32", "on_load", "in_place")
        result["load"] = [run_child(mode, path, args.bpw) for mode in modes] if "load" in parts else []
        result["forward"] = bench_forward(path, args.bpw, args.repeat) if "forward" in parts else []
        result["routing"] = (bench_routing(path, args.calibration_samples, args.calibration_seqlen)
                             if "routing" in parts else {})
    print(json.dumps(result, indent=1))
    print("\n| way in | seconds | peak RSS MiB (after imports) |\n|---|---|---|")
    for r in result["load"]:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} ({r['rss_after_imports_mib']:.0f}) |")
    print("\n| tokens | experts hit | experts module | ms |\n|---|---|---|---|")
    for r in result["forward"]:
        print(f"| {r['tokens']} | {r['experts_hit']} | {r['module']} | {r['ms']:.2f} |")
    print("\n| layer | tokens per expert: min / median / max | experts without tokens |\n|---|---|---|")
    for layer, r in result["routing"].items():
        print(f"| {layer} | {r['min']} / {r['median']:.0f} / {r['max']} | {r['without_tokens']} |")


if __name__ == "__main__":
    main()
