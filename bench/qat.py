"""Quantization-aware training of SmolLM2-135M on the training split, with distillation from the fp model.

usage: python bench/qat.py [--bpw 1.0] [--start calibrated|data-free] [--calib-samples 32] [--calib-steps 30]
                           [--minutes 20] [--seqlen 256] [--batch 4] [--lr 1e-4] [--warmup-steps N]
                           [--estimator smoothsign] [--hidden-loss mse|token_normalized] [--hidden-weight 10]
                           [--scheduler constant_with_warmup] [--start-dir DIR] [--threads 2]
                           [--max-tokens 8192] [--out bench/results/qat_1.0.json] [--plot bench/results/qat_1.0.png]

Starts from the post-training model (``--start calibrated``: block-wise reconstruction on the training split), measures
perplexity on the test split (first ``--max-tokens`` tokens, 2048-token windows), trains with
``hf_littlebit.LittleBitTrainer`` (teacher = the fp model, the paper's KD loss) on non-overlapping ``--seqlen``-token
chunks of the training split for ``--minutes`` of wall time (constant lr after 2% warmup), packs, measures again, and
writes the numbers, tokens seen and the loss curve. ``--start-dir`` caches the post-training model (saved packed
on the first run, reloaded by later runs), so several QAT settings can start from the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_littlebit
from hf_littlebit.assets import ensure_assets
from hf_littlebit.eval.perplexity import perplexity, tokenize_stream


class TimeBudget(TrainerCallback):
    """Stop training once ``seconds`` of wall time have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, default=1.0)
    ap.add_argument("--method", default="littlebit")
    ap.add_argument("--start", choices=["calibrated", "data-free"], default="calibrated")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-steps", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, help="default: 2%% of one epoch over the tokenised prefix")
    ap.add_argument("--estimator", default="smoothsign")
    ap.add_argument("--hidden-loss", default="mse", choices=["mse", "token_normalized"])
    ap.add_argument("--hidden-weight", type=float, default=10.0)
    ap.add_argument("--scheduler", default="constant_with_warmup")
    ap.add_argument("--start-dir", help="save the post-training model here, or reload it if already saved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--cache-dir")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="more LittleBitConfig fields of the post-training start (JSON values): dbf_iterations=30")
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = Path(args.out or f"bench/results/qat_{args.bpw:g}.json")
    plot_path = Path(args.plot or out.with_suffix(".png"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    assets = ensure_assets(args.cache_dir)
    path = str(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    test_ids = tokenize_stream(tok, assets.text("test"), args.max_tokens)
    train_text = assets.text("train")

    teacher = AutoModelForCausalLM.from_pretrained(path)
    fp_ppl = perplexity(teacher, token_ids=test_ids, seqlen=2048, progress=False).ppl
    start_dir = Path(args.start_dir) if args.start_dir else None
    t = time.perf_counter()
    if start_dir is not None and (start_dir / "config.json").exists():
        student = AutoModelForCausalLM.from_pretrained(start_dir)
        seconds_ptq = json.loads((start_dir / "post_training.json").read_text())["seconds"]
    else:
        student = AutoModelForCausalLM.from_pretrained(path)
        cfg = hf_littlebit.LittleBitConfig(bpw=args.bpw, method=args.method, calibration_samples=args.calib_samples,
                                           calibration_steps=args.calib_steps, sign_estimator=args.estimator,
                                           **overrides)
        hf_littlebit.quantize(student, cfg, calibration=train_text if args.start == "calibrated" else None,
                              tokenizer=tok, progress=False)
        seconds_ptq = time.perf_counter() - t
        if start_dir is not None:
            student.save_pretrained(start_dir)
            (start_dir / "post_training.json").write_text(json.dumps({"seconds": seconds_ptq}))
    ppl_before = perplexity(student, token_ids=test_ids, seqlen=2048, progress=False).ppl
    print(f"fp {fp_ppl:.2f}  post-training ({args.start}) {ppl_before:.4g}  [{seconds_ptq:.0f} s]", flush=True)

    # Training chunks: a prefix of the training split, disjoint from the test split by construction.
    n_tokens = int(args.minutes * 60 * 2 * args.batch * args.seqlen)  # bound: 2 steps/s is beyond a CPU
    ids = tokenize_stream(tok, train_text, n_tokens)
    chunks = ids[: len(ids) // args.seqlen * args.seqlen].reshape(-1, args.seqlen)
    data = [{"input_ids": row, "labels": row} for row in chunks]
    hf_littlebit.make_trainable(student, estimator=args.estimator)
    targs = TrainingArguments(
        output_dir=str(out.parent / "qat_run"), per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, int(0.02 * len(data) / args.batch)),
        num_train_epochs=1, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=0, max_grad_norm=1.0,
    )
    distill = hf_littlebit.DistillationConfig(hidden_loss=args.hidden_loss, hidden_mse_weight=args.hidden_weight)
    trainer = hf_littlebit.LittleBitTrainer(model=student, args=targs, train_dataset=data, teacher=teacher,
                                            distillation=distill,
                                            callbacks=[TimeBudget(args.minutes * 60)])
    t = time.perf_counter()
    trainer.train()
    seconds_qat = time.perf_counter() - t
    steps = trainer.state.global_step
    ppl_after = perplexity(student, token_ids=test_ids, seqlen=2048, progress=False).ppl
    gap_closed = (math.log(ppl_before) - math.log(ppl_after)) / (math.log(ppl_before) - math.log(fp_ppl))
    summary = hf_littlebit.summary(student)
    result = {
        "bpw_target": args.bpw, "bpw_true": summary.bpw_true, "method": args.method, "start": args.start,
        "overrides": overrides,
        "fp_ppl": fp_ppl, "ppl_before": ppl_before, "ppl_after": ppl_after, "log_gap_closed": gap_closed,
        "steps": steps, "tokens_seen": steps * args.batch * args.seqlen, "seconds_post_training": seconds_ptq,
        "seconds_qat": seconds_qat, "lr": args.lr, "scheduler": args.scheduler, "estimator": args.estimator,
        "hidden_loss": args.hidden_loss, "hidden_weight": args.hidden_weight, "seqlen": args.seqlen,
        "batch": args.batch, "history": [h for h in trainer.state.log_history if "loss" in h],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    if plot_path:
        plot(result, plot_path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result["history"]
    steps = [h["step"] for h in hist]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "kd_loss", "lm_loss"):
        if all(key in h for h in hist):
            ax.plot(steps, [h[key] for h in hist], label=key)
    ax.set_yscale("log")
    ax.set_xlabel(f"optimizer step ({result['batch']} × {result['seqlen']} tokens)")
    ax.set_title(f"QAT at {result['bpw_true']:.2f} bpw: ppl {result['ppl_before']:.3g} → {result['ppl_after']:.3g}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
