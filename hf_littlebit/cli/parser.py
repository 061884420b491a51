"""The ``littlebit`` command's arguments (kept apart so ``--help`` and bad arguments cost no heavy import)."""

from __future__ import annotations

import argparse

from .recipes import DEFAULT_RECIPE, RECIPES


def _per_recipe(field: str) -> str:
    """``demo 128, standard 128``: a calibration field's value in each recipe, for the help of the flag that overrides
    it (read from the recipes, so the help never drifts from them)."""
    return ", ".join(f"{r.name} {r.fields.get(field, 0)}" for r in RECIPES)


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
                   help="littlebit (Dual-SVID), littlebit2 (Joint-ITQ), dbf (Double Binary Factorization) or lbadmm "
                        "(NanoQuant's latent-binary ADMM); default: the recipe's when calibrating (demo: lbadmm), "
                        "littlebit data-free (seconds instead of minutes, and no worse without data)")
    q.add_argument("--itq-iterations", type=int, default=50, help="Joint-ITQ iterations of littlebit2")
    q.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="two binary paths (--residual) or one (--no-residual); default: the method's own choice "
                        "(on for littlebit/littlebit2, off for dbf/lbadmm)")
    q.add_argument("--allocation", default=None, choices=["uniform", "auto"],
                   help="same bpw in every layer, or one model-wide budget spread by each layer's spectrum; "
                        "default: auto for dbf/lbadmm (it spends the budget to the bit; DBF's own rank rule "
                        "overshoots it by ~10%%), else uniform")
    q.add_argument("--dbf-iterations", type=int, default=None,
                   help="outer ADMM alternations of dbf, iterations of lbadmm (default: the recipe's, 30 for a CPU; "
                        "the library default is 100)")
    q.add_argument("--whole-model", action="store_true",
                   help="also pack the input embedding and the LM head (tied ones stored once); --bpw then budgets "
                        "every parameter of the model, norms and biases included")
    q.add_argument("--embedding-bits", type=int, default=None,
                   help="with --whole-model: store the embedding (and a tied head) as BITS-bit codes (2-8) with an "
                        "fp16 scale and zero per group instead of binary low-rank; its true bits come out of the "
                        "budget first (default: binary low-rank)")
    q.add_argument("--embedding-group-size", type=int, default=64,
                   help="entries per group of --embedding-bits (default 64)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", help="output folder (default: ./littlebit-out/<model>-<bpw>bpw)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load and run the model in (default float32, best on CPU)")
    q.add_argument("--save-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the tensors saved outside the packed layers (embedding and LM head unless "
                        "--whole-model, norms); the model is rounded to it before --eval, so the perplexity is the "
                        "saved model's; a reload still runs in --dtype (default: bfloat16 for a float32 run, half "
                        "the size; a 16-bit --dtype saves in itself)")
    q.add_argument("--eval", action="store_true", help="perplexity of the original and the quantized model")
    cal = q.add_mutually_exclusive_group()
    cal.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                     help="block-wise reconstruction on the training split (default when the corpora are available)")
    cal.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="data-free quantization")
    recipes = ", ".join(f"{r.name} (~{r.minutes:g} min: {r.measured})" for r in RECIPES)
    budget = q.add_mutually_exclusive_group()
    budget.add_argument("--recipe", choices=[r.name for r in RECIPES], default=None,
                        help=f"calibration recipe (default {DEFAULT_RECIPE}); measured on SmolLM2-135M, 2 CPU cores: "
                             f"{recipes}. --method, --dbf-iterations and the calibration flags override single "
                             "settings")
    budget.add_argument("--budget-minutes", type=float, default=None,
                        help="pick the longest recipe that fits this many minutes of quantization (scaled by the "
                             "model's parameter count and, above a recipe's measured rate, by --bpw, from the SmolLM2 "
                             "measurements)")
    q.add_argument("--calib-samples", type=int, default=None,
                   help=f"calibration sequences (recipes: {_per_recipe('calibration_samples')})")
    q.add_argument("--calib-seqlen", type=int, default=None,
                   help=f"tokens per calibration sequence (recipes: {_per_recipe('calibration_seqlen')})")
    q.add_argument("--calib-batch-size", type=int, default=None,
                   help="calibration sequences per optimiser step, block-wise and end-to-end (recipes: "
                        f"{_per_recipe('calibration_batch_size')}; keep sequences × length per step near 1,024 tokens)")
    q.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps per transformer block (recipes: {_per_recipe('calibration_steps')}; more is "
                        "better)")
    q.add_argument("--fisher", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the fp model's output-gradient Fisher diagonal first and use it to precondition "
                        "each factorisation and to weight the block loss (one extra forward/backward pass)")
    q.add_argument("--mitigation-steps", type=int, default=None,
                   help="error-propagation mitigation: factorise a block's layers one at a time, each after this many "
                        f"Adam steps on the block's still-dense weights (0: off; recipes: "
                        f"{_per_recipe('calibration_mitigation_steps')})")
    q.add_argument("--e2e-steps", type=int, default=None,
                   help="steps of the end-to-end phase after the block-wise pass (scales tuned on the fp model's "
                        f"next-token distribution; 0 skips it; recipes: {_per_recipe('calibration_e2e_steps')})")
    latents_on = [r.name for r in RECIPES if r.fields.get("calibration_e2e_latents")]
    q.add_argument("--e2e-latents", action=argparse.BooleanOptionalAction, default=None,
                   help="let the end-to-end phase tune the ±1 factors too (their latents, at the block fits' learning "
                        "rate), not only the scales; " + (f"on in {', '.join(latents_on)}" if latents_on
                                                          else "off in every recipe"))
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
