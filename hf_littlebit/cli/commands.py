"""What each ``littlebit`` subcommand does; every heavy import is inside the command that needs it."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any


class CLIError(Exception):
    pass


def resolve_model(name: str | None, cache_dir: str | None) -> str:
    from ..assets import SMOLLM2, ensure_assets

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
    from ..assets import ensure_assets

    return ensure_assets(cache_dir, model=False).text("test")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def calibration_text(args: argparse.Namespace) -> str | None:
    """The training split when calibrating (``--calibrate``, or by default when the corpora can be prepared)."""
    from transformers.utils import logging as hf_logging

    from ..assets import AssetError, ensure_assets

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


SAMPLE_PROMPT = "The capital of France is"
SAMPLE_TOKENS = 12


def measure(model, tokenizer, text: str, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity on the test text, and the greedy continuation of :data:`SAMPLE_PROMPT` (perplexity alone does not
    show a model that repeats one word)."""
    import torch

    from ..eval.perplexity import perplexity

    t = time.perf_counter()
    res = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                     batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - t
    ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    sample = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {**res.to_dict(), "seconds": seconds, "sample": sample}


def auto_allocation_fits(path: str, config) -> bool:
    """Whether ``allocation="auto"`` can give every Linear that ``config`` converts in the model at ``path`` at least
    ``min_rank`` within the budget (shapes from a meta-device instance: no weights are loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import HfQuantizer

    from ..quantize.allocate import min_rank_bits
    from ..quantize.plan import auto_budget_bits, plan_conversion, resolve_modules_to_not_convert

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None)
    defaults = HfQuantizer.get_modules_to_not_convert(model, None, keep_fp32)
    skips = resolve_modules_to_not_convert(model, config, defaults)
    plans = plan_conversion(model, config, skips, pre_quantized=False)
    budget = auto_budget_bits(plans, config)
    if config.whole_model:
        from ..quantize.whole_model import whole_model_budget

        plans, budget, _ = whole_model_budget(model, config, plans)
    need = min_rank_bits(((p.in_features, p.out_features) for p in plans), config.residual, config.min_rank)
    return need <= budget


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weight files of a saved model folder (what a download costs; config and tokenizer left out)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def chosen_recipe(args: argparse.Namespace, path: str):
    """The recipe named by ``--recipe``, picked by ``--budget-minutes``, or the default."""
    from .recipes import DEFAULT_RECIPE, count_parameters, recipe_for_budget, recipe_named

    if args.budget_minutes is None:
        return recipe_named(args.recipe or DEFAULT_RECIPE)
    params = count_parameters(path)
    if params is None:
        raise CLIError(f"--budget-minutes needs a local folder with safetensors weights to size {path!r}; "
                       "use --recipe instead")
    try:
        return recipe_for_budget(args.budget_minutes, params, args.bpw)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import ADMM_METHODS, LittleBitConfig
    from ..eval.summary import summary
    from ..integrations.dense_dtype import round_dense_remainder_
    from ..integrations.hub import save_pretrained
    from ..integrations.in_place import quantize

    # flag → LittleBitConfig field; a flag left unset takes the recipe's value
    flags = {"method": "method", "dbf_iterations": "dbf_iterations", "calib_samples": "calibration_samples",
             "calib_seqlen": "calibration_seqlen", "calib_batch_size": "calibration_batch_size",
             "steps": "calibration_steps", "e2e_steps": "calibration_e2e_steps",
             "fisher": "calibration_fisher", "mitigation_steps": "calibration_mitigation_steps",
             "e2e_latents": "calibration_e2e_latents"}
    explicit = {name: getattr(args, flag) for flag, name in flags.items() if getattr(args, flag) is not None}

    def make_config(fields: dict[str, Any], allocation: str) -> LittleBitConfig:
        return LittleBitConfig(bpw=args.bpw, residual=args.residual, seed=args.seed, allocation=allocation,
                               itq_iterations=args.itq_iterations, whole_model=args.whole_model,
                               embedding_bits=args.embedding_bits, embedding_group_size=args.embedding_group_size,
                               **fields)

    make_config(explicit, args.allocation or "uniform")  # bad arguments fail before any work
    path = resolve_model(args.model, args.cache_dir)
    calibration = calibration_text(args)
    if calibration is None:  # data-free: no recipe; Dual-SVID unless asked otherwise
        calibration_only = ["recipe", "budget_minutes", *(f for f, name in flags.items()
                                                           if name.startswith("calibration_"))]
        unused = ["--" + flag.replace("_", "-") for flag in calibration_only if getattr(args, flag) is not None]
        if unused:
            from transformers.utils import logging as hf_logging

            hf_logging.get_logger("hf_littlebit.cli").warning(
                f"quantizing data-free: {', '.join(unused)} only apply to calibration and are ignored")
        fields = {"method": "littlebit", "dbf_iterations": 30, **explicit}
        recipe = None
    else:
        recipe = chosen_recipe(args, path)
        fields = {**recipe.fields, **explicit}
    args.method = fields["method"]
    config = make_config(fields, args.allocation or ("auto" if args.method in ADMM_METHODS else "uniform"))
    dtype = getattr(torch, args.dtype)
    label = Path(path).name if Path(path).is_dir() else path.replace("/", "--")
    out = Path(args.out or Path("littlebit-out") / f"{label}-{args.bpw:g}bpw")
    result: dict[str, Any] = {"model": args.model or "smollm2-135m-instruct (bundled)", "model_path": path,
                              "method": args.method, "allocation": config.allocation, "residual": config.residual,
                              "bpw_target": args.bpw, "whole_model": args.whole_model,
                              **({"embedding_bits": args.embedding_bits,
                                  "embedding_group_size": args.embedding_group_size} if args.embedding_bits else {}),
                              "calibrated": calibration is not None}
    if recipe is not None:
        result["recipe"] = recipe.name
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
        config = make_config(fields, "uniform")
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
                          calib_batch_size=config.calibration_batch_size,
                          steps_per_block=config.calibration_steps,
                          block_loss_before=sum(b.loss_before for b in blocks) / len(blocks),
                          block_loss_after=sum(b.loss_after for b in blocks) / len(blocks))
        e2e = model.hf_quantizer.reconstruction.end_to_end
        if e2e is not None:
            result.update(e2e_steps=e2e.steps, e2e_latents=config.calibration_e2e_latents, e2e_kl_before=e2e.kl_before,
                          e2e_kl_after=e2e.kl_after)
    result["seconds_quantize"] = time.perf_counter() - t
    save_dtype = args.save_dtype or ("bfloat16" if args.dtype == "float32" else args.dtype)
    if save_dtype != args.dtype:  # what is measured below is what is saved
        round_dense_remainder_(model, getattr(torch, save_dtype))
        model.config.quantization_config.dense_save_dtype = save_dtype
    result["save_dtype"] = save_dtype
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
        model_bytes_in_memory=report.model_bytes, unconverted_share=report.unconverted_share,
        bpw_whole_model=report.bpw_whole_model, checkpoint_bytes=checkpoint_bytes(out),
        bpw_checkpoint=8 * checkpoint_bytes(out) / report.model_params if report.model_params else float("nan"),
    )
    embedding = next((r for r in report.layers if r.kind != "linear"), None)
    if embedding is not None:  # whole model: the embedding's own format and rate
        result.update(embedding_format=embedding.format if embedding.format != "binary"
                      else f"binary rank {embedding.rank}", bpw_embedding=embedding.bpw_true)
    if args.eval:
        q_eval = measure(model, tokenizer, text, args)
        result.update(ppl_fp=fp_eval["ppl"], ppl_quantized=q_eval["ppl"], eval_tokens=q_eval["tokens"],
                      eval_seqlen=q_eval["seqlen"], seconds_eval_fp=fp_eval["seconds"],
                      seconds_eval_quantized=q_eval["seconds"], sample_prompt=SAMPLE_PROMPT,
                      sample_fp=fp_eval["sample"], sample_quantized=q_eval["sample"])
    return result


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from ..eval.summary import summary
    from ..nn.layer import littlebit_layers

    path = resolve_model(args.model, args.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    res = {"model": path, **measure(model, load_tokenizer(path), test_text(args.cache_dir), args),
           "sample_prompt": SAMPLE_PROMPT}
    if littlebit_layers(model):
        res["bpw_true"] = summary(model).bpw_true
    return res


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from ..eval.summary import summary
    from ..integrations.hub import from_pretrained, read_quantization_config

    qcfg = read_quantization_config(args.dir)
    report = summary(from_pretrained(args.dir))
    return {"dir": args.dir, "quantization_config": qcfg, "summary": report.to_dict(), "_table": str(report)}


def cmd_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from ..assets import ensure_assets

    assets = ensure_assets(args.cache_dir)
    return {"model_dir": str(assets.model_dir), **{f"corpus_{k}": str(v) for k, v in assets.corpora.items()}}
