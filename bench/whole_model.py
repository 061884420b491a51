"""Whole-model compression (issue 22) on the bundled SmolLM2-135M: checkpoint bytes and perplexity of
``whole_model=True`` (embedding and tied LM head packed too, ``bpw`` budgets every parameter) against the
linears-only conversion (embedding / head left dense) at the same target.

usage: python bench/whole_model.py [--whole-bpw 4.0 1.0 0.55] [--linears-bpw 1.0 0.55] [--allocation auto]
                                   [--method littlebit] [--calibrate [--recipe demo]] [--max-tokens 8192]
                                   [--seqlen 2048]
                                   [--embedding-bits 2 --embedding-group-size 128]
                                   [--out bench/results/whole_model.json] [--plot bench/results/whole_model.png]
       python bench/whole_model.py --report-only

Each row quantizes a fresh fp32 copy (data-free unless ``--calibrate``: 32 × 256 tokens of the training split, 30
steps per block, 20 end-to-end steps; with ``--recipe NAME`` the calibration fields of that
``littlebit quantize`` recipe), measures the perplexity on the first ``--max-tokens`` tokens of the test
split (fp32 compute), then casts the tensors that stayed dense (embedding and head of the linears-only rows, norms)
to bf16 — how such a model is shipped — and saves it with ``save_pretrained``: "checkpoint MB" is the bytes of the
``.safetensors`` files (what a download costs). Rows are appended to ``--out`` as they come; ``--skip-done`` skips
rows already there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_littlebit
from hf_littlebit.assets import ensure_assets
from hf_littlebit.cli.recipes import RECIPES, recipe_named
from hf_littlebit.eval.perplexity import perplexity, tokenize_stream
from hf_littlebit.integrations.dense_dtype import PACKED_MODULES


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def dense_to_bf16_(model: torch.nn.Module) -> None:
    """Cast every floating tensor outside the packed modules to bf16 (the packed scales keep their dtype; so do a
    group-quantized embedding's fp16 scales and zeros)."""
    packed = {id(p) for m in model.modules() if isinstance(m, PACKED_MODULES) for p in m.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in packed and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)


def split_rates(report: hf_littlebit.ModelSummary) -> dict:
    """True bpw of the decoder linears and of the embedding (+ tied head) separately, and the embedding's rank."""
    out = {}
    for kind, rows in (("linears", [r for r in report.layers if r.kind == "linear"]),
                       ("embedding", [r for r in report.layers if r.kind != "linear"])):
        if rows:
            dense = sum(r.in_features * r.out_features for r in rows)
            out[f"bpw_{kind}"] = sum(r.bpw_true * r.in_features * r.out_features for r in rows) / dense
    emb = next((r for r in report.layers if r.kind != "linear"), None)
    out["embedding_rank"] = emb.rank if emb is not None else None
    if emb is not None and emb.format != "binary":
        out["embedding_format"] = emb.format
    return out


def planned_rates(path: str, row: dict) -> dict:
    """:func:`split_rates` of a whole-model row from its plan alone (allocation, no factorisation): for rows
    measured before the bench recorded the split (``--fill-rates``)."""
    from transformers.quantizers import HfQuantizer

    from hf_littlebit.format.budget import stored_bits
    from hf_littlebit.quantize.plan import plan_conversion, resolve_modules_to_not_convert
    from hf_littlebit.quantize.whole_model import whole_model_plans

    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = hf_littlebit.LittleBitConfig(bpw=row["bpw_target"], method=row["method"], allocation=row["allocation"],
                                       whole_model=True)
    defaults = HfQuantizer.get_modules_to_not_convert(model, None, None)
    cfg.modules_to_not_convert = resolve_modules_to_not_convert(model, cfg, defaults)
    plans, _ = whole_model_plans(model, cfg, plan_conversion(model, cfg, cfg.modules_to_not_convert, False))
    out = {}
    for kind in ("linear", "embedding"):
        chosen = [p for p in plans if p.kind == kind]
        bits = sum(stored_bits(p.in_features, p.out_features, p.rank, cfg.residual) for p in chosen)
        out["bpw_linears" if kind == "linear" else "bpw_embedding"] = bits / sum(
            p.in_features * p.out_features for p in chosen)
    out["embedding_rank"] = next(p.rank for p in plans if p.kind == "embedding")
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| scope | method | allocation | target bpw | true bpw: linears / embedding (rank) | "
             "whole model bits/param | checkpoint MB | perplexity | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        emb = (f"{r['bpw_embedding']:.3f} ({r.get('embedding_format') or r['embedding_rank']})"
               if r.get("bpw_embedding") is not None else "dense")
        split = f"{r['bpw_linears']:.3f} / {emb}" if "bpw_linears" in r else f"{r['bpw_true']:.3f}"
        lines.append(f"| {r['scope']} | {r['method']}{' (calibrated)' if r.get('calibrated') else ''} | "
                     f"{r['allocation']} | {r['bpw_target']} | {split} | {r['bpw_whole_model']:.3f} | "
                     f"{r['checkpoint_bytes'] / 1e6:.2f} | {r['ppl']:.4g} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, references: Sequence[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scope, marker in (("linears only", "o"), ("whole model", "s")):
        for calibrated in (False, True):
            pts = sorted((r["checkpoint_bytes"] / 1e6, r["ppl"]) for r in rows
                         if r["scope"] == scope and bool(r.get("calibrated")) == calibrated)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="none", fillstyle="full" if calibrated
                        else "none", label=f"{scope}, {'calibrated' if calibrated else 'data-free'}")
    for item in references:  # "LABEL:MB:PPL", a point measured by another harness (say which in the label)
        label, mb, ppl = item.rsplit(":", 2)
        ax.plot([float(mb)], [float(ppl)], marker="D", linestyle="none", label=label)
    ax.set_xlabel("checkpoint MB (safetensors)")
    ax.set_ylabel("perplexity (Wikipedia test split)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure_row(path: str, tok, ids: torch.Tensor, scope: str, bpw: float, allocation: str,  # noqa: ANN001
                args: argparse.Namespace, calibration: str | None) -> dict:
    fields = {"method": args.method, "calibration_samples": 32, "calibration_steps": 30, "calibration_e2e_steps": 20}
    if args.recipe:
        fields = dict(recipe_named(args.recipe).fields)
    cfg = hf_littlebit.LittleBitConfig(bpw=bpw, allocation=allocation, whole_model=scope == "whole model",
                                       embedding_bits=args.embedding_bits if scope == "whole model" else None,
                                       embedding_group_size=args.embedding_group_size, **fields)
    model = AutoModelForCausalLM.from_pretrained(path)
    t0 = time.perf_counter()
    hf_littlebit.quantize(model, cfg, calibration=calibration, tokenizer=tok, progress=False)
    seconds = time.perf_counter() - t0
    res = perplexity(model, token_ids=ids, seqlen=args.seqlen, progress=False)
    dense_to_bf16_(model)
    report = hf_littlebit.summary(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = checkpoint_bytes(Path(folder))
    return {"scope": scope, "method": cfg.method, "allocation": allocation, "bpw_target": bpw,
            **({"recipe": args.recipe} if args.recipe else {}),
            "calibrated": calibration is not None, "bpw_true": report.bpw_true, **split_rates(report),
            "bpw_whole_model": report.bpw_whole_model, "checkpoint_bytes": size,
            "bpw_checkpoint": 8 * size / report.model_params, "ppl": res.ppl, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--whole-bpw", type=float, nargs="*", default=[4.0, 1.0, 0.55])
    ap.add_argument("--linears-bpw", type=float, nargs="*", default=[1.0, 0.55])
    ap.add_argument("--allocation", nargs="+", default=["auto"])
    ap.add_argument("--method", default="littlebit")
    ap.add_argument("--skip-done", action="store_true")
    ap.add_argument("--embedding-bits", type=int, default=None,
                    help="whole-model rows: group-quantized embedding of this many bits (default: binary low-rank)")
    ap.add_argument("--embedding-group-size", type=int, default=64)
    ap.add_argument("--calibrate", action="store_true", help="calibrated rows (minutes each on a CPU)")
    ap.add_argument("--recipe", choices=[r.name for r in RECIPES], default=None,
                    help="with --calibrate: the CLI recipe's calibration fields (method included) instead of the "
                         "32 × 256 / 30 steps / 20 end-to-end steps default")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/whole_model.json")
    ap.add_argument("--plot", default="bench/results/whole_model.png")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--reference", nargs="*", default=[], metavar="LABEL:MB:PPL",
                    help="with --report-only: extra plot points measured elsewhere (the label should say where)")
    ap.add_argument("--fill-rates", action="store_true",
                    help="add the linears / embedding split to whole-model rows of --out that lack it (plans only)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.fill_rates:
        data = json.loads(out.read_text())
        for row in data["rows"]:
            if row["scope"] == "whole model" and "bpw_linears" not in row:
                row.update(planned_rates(str(ensure_assets(args.cache_dir).model_dir), row))
            elif row["scope"] == "linears only" and "bpw_linears" not in row:
                row["bpw_linears"] = row["bpw_true"]
        out.write_text(json.dumps(data, indent=1))
        args.report_only = True
    if args.report_only:
        rows = json.loads(out.read_text())["rows"]
        print(markdown(rows))
        if args.plot:
            plot(rows, Path(args.plot), args.reference)
        return
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    assets = ensure_assets(args.cache_dir)
    path = str(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tokenize_stream(tok, assets.text("test"), args.max_tokens)
    calibration = assets.text("train") if args.calibrate else None
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)

    if not any(r["scope"] == "fp32 reference" for r in rows):
        fp = AutoModelForCausalLM.from_pretrained(path)
        params = sum(p.numel() for p in fp.parameters())
        rows.append({"scope": "fp32 reference", "method": "—", "allocation": "—", "bpw_target": "—",
                     "bpw_true": 16.0, "bpw_whole_model": 16.0, "checkpoint_bytes": 2 * params,
                     "ppl": perplexity(fp, token_ids=ids, seqlen=args.seqlen, progress=False).ppl, "seconds": 0})
        del fp
    todo = [("whole model", b) for b in args.whole_bpw] + [("linears only", b) for b in args.linears_bpw]
    for scope, bpw in todo:
        for allocation in args.allocation:
            group = (f"{args.embedding_bits}-bit g{args.embedding_group_size}"
                     if args.embedding_bits and scope == "whole model" else None)
            method = recipe_named(args.recipe).fields["method"] if args.recipe else args.method
            key = (scope, method, allocation, bpw, calibration is not None, group, args.recipe)
            if args.skip_done and any((r["scope"], r["method"], r["allocation"], r["bpw_target"],
                                       r.get("calibrated", False), r.get("embedding_format"), r.get("recipe")) == key
                                      for r in rows):
                continue
            rows.append(measure_row(path, tok, ids, scope, bpw, allocation, args, calibration))
            print(json.dumps(rows[-1]), flush=True)
            out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens,
                                       "seqlen": args.seqlen, "rows": rows}, indent=1))
    print(markdown(rows))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
