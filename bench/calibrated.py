"""Calibrated block-wise reconstruction vs data-free quantization on the bundled SmolLM2-135M, with HQQ peers.

usage: python bench/calibrated.py [--bpw 1.0 0.55 0.3 0.1] [--methods littlebit littlebit2]
                                  [--samples 32] [--seqlen 256] [--steps 30] [--hqq-bits 2 3 4]
                                  [--gptq-bits 2 3] [--gptq-group 128]
                                  [--max-tokens 8192] [--out bench/results/calibrated.json]
                                  [--plot bench/results/calibrated.png] [--report-only] [--skip-done]
                                  [--no-data-free] [--set FIELD=VALUE ...] [--tag SUFFIX]
       python bench/calibrated.py --report-only --out A.json [--merge B.json ...] [--plot P.png]
                                  [--series REGEX=LABEL ...] [--title TITLE]

Every row is measured in this run on the same first ``--max-tokens`` tokens of the test split (2048-token windows):
the fp model, HQQ at 2/3/4 bits (group 64), GPTQ (``bench/gptq.py``, calibrated on the same ``--samples`` ×
``--seqlen`` training tokens as the LittleBit rows), and for each bpw × method the data-free model and the calibrated
one
(``hf_littlebit.quantize(model, config, calibration=<training split>)``). Rows are appended to the JSON as they
come, so an interrupted run keeps what it measured; ``--skip-done`` skips rows already in the file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from gptq import gptq_
from sweep import hqq_, linear_layers, simulate
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import hf_littlebit
from hf_littlebit.assets import ensure_assets
from hf_littlebit.eval.perplexity import perplexity, tokenize_stream
from hf_littlebit.quantize.calibration import calibration_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, nargs="*", default=[1.0, 0.55, 0.3, 0.1])
    ap.add_argument("--methods", nargs="*", default=["littlebit", "littlebit2"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hqq-bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--gptq-bits", type=int, nargs="*", default=[])
    ap.add_argument("--gptq-group", type=int, default=128)
    ap.add_argument("--no-data-free", action="store_true", help="only the calibrated rows")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="LittleBitConfig fields of the new rows (JSON values): calibration_tune_norms=true")
    ap.add_argument("--tag", default="", help="suffix of the new rows' names/kinds, to tell variants apart")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out", default="bench/results/calibrated.json")
    ap.add_argument("--plot", default="bench/results/calibrated.png")
    ap.add_argument("--skip-done", action="store_true", help="keep rows already in --out and skip them")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", nargs="*", default=[], help="with --report-only: more result files to report together")
    ap.add_argument("--plot-kinds", default=None, help="with --report-only: regex of the row kinds to plot")
    ap.add_argument("--title", default="SmolLM2-135M: calibrated block reconstruction vs data-free")
    ap.add_argument("--series", nargs="*", default=[], metavar="REGEX=LABEL",
                    help="with --report-only: plot only rows whose name matches a REGEX, as one line per LABEL "
                         "(rows measured under different tags become one series)")
    args = ap.parse_args()
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if (args.skip_done or args.report_only) and out.exists() \
        else []
    if args.report_only:
        for extra in args.merge:
            seen = {x["name"] for x in rows}
            rows += [r for r in json.loads(Path(extra).read_text())["rows"] if r["name"] not in seen]
        print(markdown(rows))
        if args.plot:
            shown = [r for r in rows if args.plot_kinds is None or re.search(args.plot_kinds, r["kind"])]
            if args.series:
                series = [item.split("=", 1) for item in args.series]
                shown = [{**r, "kind": next(label for pattern, label in series if re.search(pattern, r["name"]))}
                         for r in shown if any(re.search(pattern, r["name"]) for pattern, _ in series)]
            plot(shown, Path(args.plot), args.title)
        return
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    assets = ensure_assets(args.cache_dir)
    path = str(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tokenize_stream(tok, assets.text("test"), args.max_tokens)
    train = assets.text("train")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["name"] for r in rows}
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}

    def record(name: str, kind: str, bpw_target: float | None, model, bits: float, dense: int, seconds: float,
               extra: dict | None = None) -> None:
        t = time.perf_counter()
        res = perplexity(model, token_ids=ids, seqlen=2048, progress=False)
        row = {"name": name, "kind": kind, "bpw_target": bpw_target, "bpw_true": bits / dense, "ppl": res.ppl,
               "eval_tokens": res.tokens, "seconds_quantize": seconds, "seconds_eval": time.perf_counter() - t,
               **(extra or {})}
        rows.append(row)
        out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens,
                                   "samples": args.samples, "seqlen": args.seqlen, "steps": args.steps,
                                   "rows": rows}, indent=1))
        print(json.dumps(row), flush=True)

    if "fp" not in done:
        fp = AutoModelForCausalLM.from_pretrained(path)
        dense = sum(m.weight.numel() for m in linear_layers(fp).values())
        record("fp", "fp32 (reference)", None, fp, 16 * dense, dense, 0.0)
        del fp
    for nbits in args.hqq_bits:
        name = f"hqq-{nbits}bit"
        if name in done:
            continue
        model = AutoModelForCausalLM.from_pretrained(path)
        t = time.perf_counter()
        bits, n = simulate(model, lambda w, _n=nbits: hqq_(w, _n))
        record(name, name, float(nbits), model, bits, n, time.perf_counter() - t)
        del model
    for nbits in args.gptq_bits:
        name = f"gptq-{nbits}bit-g{args.gptq_group}-{args.samples}x{args.seqlen}"
        if name in done:
            continue
        model = AutoModelForCausalLM.from_pretrained(path)
        tokens = calibration_tokens(train, tok, args.samples, args.seqlen, seed=0,
                                    vocab_size=model.config.vocab_size)
        t = time.perf_counter()
        bits, n = gptq_(model, tokens, nbits, args.gptq_group)
        record(name, f"gptq-{nbits}bit g{args.gptq_group}", float(nbits), model, bits, n, time.perf_counter() - t,
               {"samples": args.samples, "seqlen": args.seqlen})
        del model
    for bpw in args.bpw:
        for method in args.methods:
            for calibrated in ((False, True) if not args.no_data_free else (True,)):
                variant = f"{'calibrated' if calibrated else 'data-free'}{args.tag}"
                name = f"{method}-{variant}-{bpw:g}"
                if name in done:
                    continue
                cfg = hf_littlebit.LittleBitConfig(
                    bpw=bpw, method=method, calibration_samples=args.samples, calibration_seqlen=args.seqlen,
                    calibration_steps=args.steps, **overrides,
                )
                model = AutoModelForCausalLM.from_pretrained(path)
                t = time.perf_counter()
                hf_littlebit.quantize(model, cfg, calibration=train if calibrated else None, tokenizer=tok,
                                      progress=False)
                seconds = time.perf_counter() - t
                report = hf_littlebit.summary(model)
                extra = {"method": method, "calibrated": calibrated,
                         **overrides, **({"samples": args.samples, "seqlen": args.seqlen, "steps": args.steps}
                                         if calibrated else {})}
                blocks = model.hf_quantizer.reconstruction.blocks if calibrated else []
                if blocks:
                    extra["block_loss_before"] = [round(b.loss_before, 5) for b in blocks]
                    extra["block_loss_after"] = [round(b.loss_after, 5) for b in blocks]
                e2e = model.hf_quantizer.reconstruction.end_to_end if calibrated else None
                if e2e is not None:
                    extra.update(e2e_kl_before=e2e.kl_before, e2e_kl_after=e2e.kl_after, e2e_seconds=e2e.seconds)
                record(name, f"{method} {variant}", bpw, model,
                       report.bpw_true * report.converted_params, report.converted_params, seconds, extra)
                del model
    print(markdown(rows))
    if args.plot:
        plot(rows, Path(args.plot))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | target bpw | true bpw (linear layers) | perplexity | quantize s |", "|---|---|---|---|---|"]
    for r in rows:
        target = "—" if r["bpw_target"] is None else f"{r['bpw_target']:g}"
        ppl = f"{r['ppl']:.2f}" if r["ppl"] < 1e4 else f"{r['ppl']:.2e}"
        lines.append(f"| {r['kind']} | {target} | {r['bpw_true']:.3f} | {ppl} | {r['seconds_quantize']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "SmolLM2-135M: calibrated block reconstruction vs data-free"
         ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        pts = sorted((r["bpw_true"], r["ppl"]) for r in rows if r["kind"] == kind and math.isfinite(r["ppl"]))
        if kind.startswith("fp32"):
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=f"fp model ({pts[0][1]:.1f})")
            continue
        style = "s" if kind.lower().startswith(("hqq", "gptq")) else ("x" if "data-free" in kind else "o")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=style, ls="-" if len(pts) > 1 else "",
                label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight of the decoder linear layers")
    ax.set_ylabel("perplexity (Wikipedia test split)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
